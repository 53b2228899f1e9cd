"""Text the pipeline writes and reads back: the paraphrase prompt, candidate cleaning, comparison form.

Pure functions, shared by sampling, ranking, the judge's minimal pairs and the retention probes.
"""

from __future__ import annotations

import re
from typing import Any

from sempa_train.core.templates import PLAIN_SEPARATOR, fill

_NON_WORD = re.compile(r"[^\w\s']+")
_SPACES = re.compile(r"\s+")
WORD = re.compile(r"[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*")  # a word; hyphenated and apostrophe words kept whole


def words(text: str) -> list[str]:
    """The lower-cased words of ``text`` (``WORD``): what the word-level candidate checks compare."""
    return [w.lower() for w in WORD.findall(text)]


def normalize_text(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: the form used for copy, duplicate and
    contamination checks."""
    return _SPACES.sub(" ", _NON_WORD.sub(" ", text.lower())).strip()


def paraphrase_prompt(premise: str, template_text: str, tokenizer: Any, *, chat: bool) -> str:
    """The text the policy sees: the filled template, as a chat turn awaiting the assistant when ``chat``."""
    content = fill(template_text, premise)
    if not chat:
        return content + PLAIN_SEPARATOR
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


_PREFIX = re.compile(
    r"^(?:sure[,.!]?\s*)?(?:here(?:'s| is| are)\s+)?(?:a |an |the |my |one )?"
    r"(?:possible |new |revised |alternative )?"
    r"(?:paraphrase[sd]?|paraphrased (?:sentence|version)|rephrased (?:sentence|version)|rewritten (?:sentence|version)"
    r"|rewrite|rephrasing|sentence|version|output|answer|response)"
    r"(?: of (?:the|this) sentence)?\s*(?:\d+\s*)?[:\-–]\s*",
    re.IGNORECASE,
)
# A longer lead-in that talks about the rewriting, up to a colon: "The sentence has been rephrased as follows:".
_LEAD_IN = re.compile(
    r"^[^:\"“]{0,80}\b(?:sentence|paraphras\w*|rephras\w*|rewrit\w*|reword\w*|version)\b[^:\"“]{0,40}:\s+(?=\S)",
    re.IGNORECASE,
)
_QUOTES = "\"'“”‘’«»"
_WHITESPACE = re.compile(r"\s+")


def clean_candidate(raw: str) -> str:
    """The paraphrase inside a raw generation: the first line with content, without a leading
    "Paraphrase:"-style label or a lead-in about the rewriting ("The sentence has been rephrased as
    follows:"), without surrounding quotes, whitespace collapsed ("" when nothing is left)."""
    for line in raw.splitlines():
        text = _LEAD_IN.sub("", _PREFIX.sub("", line.strip(), count=1).strip(), count=1)
        text = _WHITESPACE.sub(" ", _strip_quotes(text.strip()))
        if text:
            return text
    return ""


def _strip_quotes(text: str) -> str:
    """Remove quotes around a sentence, or a lone opening / closing quote, keeping apostrophes."""
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        return text[1:-1].strip()
    if text and text[0] in _QUOTES and text.count(text[0]) == 1:
        return text[1:].strip()
    if len(text) >= 2 and text[-1] in _QUOTES and text[-2] in ".!?" and text.count(text[-1]) == 1:
        return text[:-1].strip()
    return text
