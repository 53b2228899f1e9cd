"""Prompt templates of the SemPA recipe and the PromptEOL sentence preprocessing.

The paraphrase templates P1-P5 are the paper's (P1 is its default); the PromptEOL template and the
preprocessing rules follow the PromptEOL evaluation code that SemPA reuses.
"""

from __future__ import annotations

import re

PARAPHRASE_TEMPLATES: dict[str, str] = {
    "P1": 'Keep the same meaning of this sentence: "{sentence}", while making some changes.',
    "P2": 'Generate a paraphrase of this sentence: "{sentence}" that preserves its meaning, '
    "while making some changes.",
    "P3": 'Keep the main meaning of this sentence: "{sentence}", and rewrite it in a different way.',
    "P4": 'Generate a paraphrase of the sentence: "{sentence}".',
    "P5": 'Rewrite the sentence: "{sentence}" while preserving its main meaning, but the wording may be '
    "simplified or rephrased.",
}
DEFAULT_PARAPHRASE_TEMPLATE = "P1"

# Note the space before the colon and the trailing double quote: both are part of the recipe.
PROMPTEOL_TEMPLATE = 'This sentence : "{sentence}" means in one word:"'

# Ends a prompt when the model has no chat template, in sampling and in DPO training alike.
PLAIN_SEPARATOR = "\n"

_WHITESPACE = re.compile(r"\s+")


def resolve_template(template: str) -> tuple[str, str]:
    """Return ``(template_id, template_text)`` for a template name (P1-P5) or a custom template.

    A custom template is any string that contains ``{sentence}`` exactly once; its id is ``custom``.
    """
    if template in PARAPHRASE_TEMPLATES:
        return template, PARAPHRASE_TEMPLATES[template]
    if template.count("{sentence}") != 1:
        names = ", ".join(PARAPHRASE_TEMPLATES)
        raise ValueError(
            f"template must be one of {names} or a custom text containing '{{sentence}}' exactly once, "
            f"got {template!r}"
        )
    return "custom", template


def fill(template_text: str, sentence: str) -> str:
    """Put ``sentence`` into a template (plain replacement: other braces in the sentence are kept)."""
    return template_text.replace("{sentence}", sentence)


def preprocess_sentence(sentence: str) -> str:
    """Normalise a sentence the way PromptEOL does before it goes into the template.

    Collapse whitespace, turn double quotes into single quotes (they would close the template's
    quote), turn a final ``?`` into ``.``, and append ``.`` unless the sentence already ends in
    ``.``, ``?``, ``"`` or ``'``.
    """
    s = _WHITESPACE.sub(" ", sentence).strip()
    s = s.replace('"', "'")
    if s.endswith("?"):
        s = s[:-1] + "."
    if not s.endswith((".", "?", '"', "'")):
        s += "."
    return s


def prompteol_prompt(sentence: str, template: str = PROMPTEOL_TEMPLATE) -> str:
    """The PromptEOL input for one raw sentence."""
    return fill(template, preprocess_sentence(sentence))
