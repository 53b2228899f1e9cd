"""Absolute checks on sampled candidates, so that a chosen answer is a fluent English sentence, not merely
the best of a premise's candidates.

The rank stage keeps the best-scored candidate of each premise; without absolute checks that can be
gibberish ("Messingi wesner di marina fi, ..."), another language, or a sentence whose meaning changed.
Each check here drops the candidates it fails, with its own reason counted in the dataset card:

``LanguageCheck`` (``candidate_not_english``)
    py3langid (a maintained fork of langid.py; its model ships in the wheel, so it runs offline, and it is
    4.6 MB against lingua's 96 MB) labels the candidate another language with confidence at least
    ``min_confidence``, or more than ``max_foreign_letters`` of its letters are outside A–Z. Short
    English captions often get a low English probability (7.8 % of SNLI entailment hypotheses of the
    default run score below 0.5), so the check asks for a *confident other* language instead of a
    confident English one; the letter share catches mixed text ("Spanišiština odleglosuna …").
``MetaAnswerCheck`` (``candidate_meta_answer``)
    an answer *about* the sentence instead of a paraphrase of it: a leading label or instruction
    ("Rearrange the sentence to …", "The sentence is …", "Sure, …"), quotation marks or a colon the premise
    does not have ("… a music group: Two men performing …"). Pure text rules, no model.
``SpellingCheck`` (``candidate_unknown_word``)
    a word the premise does not have and that wordfreq's English word list does not know (Zipf frequency
    below ``min_zipf``): a misspelling ("motbikes"), a merged word ("Militarywoman"), a garbled one ("skIENTS").
    wordfreq (its lists ship in the wheel: offline) rather than the fluency score, which one bad word in a
    fluent sentence hardly moves. Words copied from the premise (names, rare nouns) are never checked.
``NumberCheck`` (``candidate_changed_number``)
    a number (digits or a number word) the candidate has more often than the premise: "Three people" that
    became "Two people" beside a copied "two boats".
``RepetitionCheck`` (``candidate_repeats``)
    a three-word phrase the candidate says at least twice and more often than the premise: the sentence
    repeated inside itself ("A person performs a trick while a person performs a trick …") or turned into a
    definition ("A family day at the beach is a family day").
``RoleSwapCheck`` (``candidate_swapped_roles``)
    two different person words that premise and candidate each have once, in the opposite order ("the woman
    adjusts a flower on the man's lapel" became "the man adjusts a flower on the woman's lapel"): every word
    stays, so neither the judge nor the embedding scorer sees the change. A candidate with a new "by" (a
    passive: "a man hugs a woman" → "a woman is hugged by a man") is not failed.
``FluencyCheck`` (``candidate_disfluent``)
    the mean token log-probability of the candidate as the policy's own answer to the paraphrase prompt
    (one forward pass): word salad is improbable under the model that wrote it.
``min_chosen_score`` (rank config; ``chosen_below_floor``)
    after the checks, the best candidate must still reach an absolute score, not only beat the others.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from sempa_train.core.models import left_pad, load_causal_lm, resolve_dtype, use_chat_template
from sempa_train.core.templates import resolve_template
from sempa_train.core.text import paraphrase_prompt, words

log = logging.getLogger(__name__)


class CandidateCheck(Protocol):
    """A check that fails some ``(premise, candidate)`` pairs; ``reason`` names the drop in the card."""

    reason: str

    def failing(self, premises: Sequence[str], candidates: Sequence[str]) -> list[bool]: ...


@functools.lru_cache(maxsize=1)
def language_identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def foreign_letter_share(text: str) -> float:
    """The share of letters outside ASCII A–Z/a–z (0.0 for a text without letters)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum(not ("a" <= c.lower() <= "z") for c in letters) / len(letters)


class LanguageCheck:
    """Fails candidates that are confidently another language, or written largely in non-Latin letters."""

    reason = "candidate_not_english"

    def __init__(self, language: str = "en", *, min_confidence: float = 0.6, max_foreign_letters: float = 0.05):
        self.language = language
        self.min_confidence = min_confidence
        self.max_foreign_letters = max_foreign_letters

    def is_other_language(self, text: str) -> bool:
        label, confidence = language_identifier().classify(text)
        return (label != self.language and confidence >= self.min_confidence) or \
            foreign_letter_share(text) > self.max_foreign_letters

    def failing(self, premises: Sequence[str], candidates: Sequence[str]) -> list[bool]:
        return [self.is_other_language(text) for text in candidates]


# Openings of an answer that talks about the sentence or the task rather than restating it.
_META_OPENING = re.compile(
    r"^\W*(sure|here|okay|ok|certainly|answer|output|note|paraphrase[ds]?|rephrase[ds]?|rewrite|rewritten|"
    r"rearrange[ds]?|revised|(the|this|a|your|my) (new |revised |rewritten |rephrased |paraphrased |original |"
    r"same |modified |changed )?(sentence|paraphrase|version|meaning))\b", re.IGNORECASE)
_QUOTES = "\"“”«»"


class MetaAnswerCheck:
    """Fails candidates that answer about the sentence (a label, an instruction, a quotation of it) instead of
    restating it: a meta opening, or quotation marks or a colon that the premise lacks."""

    reason = "candidate_meta_answer"

    @staticmethod
    def is_meta(premise: str, candidate: str) -> bool:
        if _META_OPENING.match(candidate):
            return True
        if any(q in candidate and q not in premise for q in _QUOTES):
            return True
        return ":" in candidate and ":" not in premise

    def failing(self, premises: Sequence[str], candidates: Sequence[str]) -> list[bool]:
        return [self.is_meta(p, c) for p, c in zip(premises, candidates, strict=True)]


NUMBER_WORDS = frozenset("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                         "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty hundred thousand "
                         "dozen".split())


class SpellingCheck:
    """Fails candidates with a word that the premise lacks and English (wordfreq) does not know."""

    reason = "candidate_unknown_word"

    def __init__(self, language: str = "en", min_zipf: float = 1.0) -> None:
        self.language = language
        self.min_zipf = min_zipf

    def unknown_words(self, premise: str, candidate: str) -> list[str]:
        from wordfreq import zipf_frequency

        known = set(words(premise))
        return [w for w in words(candidate) if w not in known and not w.isdigit()
                and zipf_frequency(w, self.language) < self.min_zipf]

    def failing(self, premises: Sequence[str], candidates: Sequence[str]) -> list[bool]:
        return [bool(self.unknown_words(p, c)) for p, c in zip(premises, candidates, strict=True)]


class NumberCheck:
    """Fails candidates with a number (digits or a number word) more often than their premise has it, or with a
    premise word made singular or plural ("in her hands" became "in her hand", "chairs" became "a chair"):
    both change how many of something there are."""

    reason = "candidate_changed_number"

    @staticmethod
    def numbers(tokens: Sequence[str]) -> Counter[str]:
        return Counter(w for w in tokens if w.isdigit() or w in NUMBER_WORDS)

    @staticmethod
    def inflected(premise_words: Sequence[str], candidate_words: Sequence[str]) -> list[str]:
        """Words of the candidate (4+ letters) that the premise lacks but has with ``s``/``es`` added or removed."""
        seen = set(premise_words)
        out = []
        for word in set(candidate_words) - seen:
            forms = {word + "s", word + "es"} | ({word[:-1]} if word.endswith("s") else set()) \
                | ({word[:-2]} if word.endswith("es") else set())
            if len(word) >= 4 and forms & seen:
                out.append(word)
        return out

    def failing(self, premises: Sequence[str], candidates: Sequence[str]) -> list[bool]:
        out = []
        for premise, candidate in zip(premises, candidates, strict=True):
            p, c = words(premise), words(candidate)  # each text split once
            out.append(bool(self.numbers(c) - self.numbers(p)) or bool(self.inflected(p, c)))
        return out


class RepetitionCheck:
    """Fails candidates that say a three-word phrase at least twice and more often than their premise does."""

    reason = "candidate_repeats"

    @staticmethod
    def repeated(premise: str, candidate: str) -> list[tuple[str, ...]]:
        """The word trigrams of ``candidate`` that occur twice or more in it and more often than in ``premise``."""
        had = _trigrams(words(premise))
        return [gram for gram, k in _trigrams(words(candidate)).items() if k >= 2 and k > had[gram]]

    def failing(self, premises: Sequence[str], candidates: Sequence[str]) -> list[bool]:
        return [bool(self.repeated(p, c)) for p, c in zip(premises, candidates, strict=True)]


def _trigrams(tokens: Sequence[str]) -> Counter[tuple[str, ...]]:
    return Counter(zip(tokens, tokens[1:], tokens[2:], strict=False))


PERSON_WORDS = frozenset("man men woman women boy boys girl girls child children kid kids person people lady ladies "
                         "guy guys gentleman gentlemen mother father mom dad daughter son sister brother wife husband "
                         "baby toddler teenager player players".split())


class RoleSwapCheck:
    """Fails candidates in which two person words that premise and candidate each have exactly once (possessive
    ``'s`` ignored) come in the opposite order, unless the candidate adds a "by" (a passive keeps the roles) or
    both sentences join the two by "and"/"or" ("a man and a woman" -> "a woman and a man": no roles to swap)."""

    reason = "candidate_swapped_roles"

    @staticmethod
    def swapped(premise: str, candidate: str) -> list[tuple[str, str]]:
        """The pairs of person words whose order ``candidate`` reverses."""
        before, after = _base_words(premise), _base_words(candidate)
        if after.count("by") > before.count("by"):
            return []
        shared = [w for w in dict.fromkeys(before)
                  if w in PERSON_WORDS and before.count(w) == 1 and after.count(w) == 1]
        return [(a, b) for i, a in enumerate(shared) for b in shared[i + 1:]
                if (before.index(a) - before.index(b)) * (after.index(a) - after.index(b)) < 0
                and not (_coordinated(before, a, b) and _coordinated(after, a, b))]

    def failing(self, premises: Sequence[str], candidates: Sequence[str]) -> list[bool]:
        return [bool(self.swapped(p, c)) for p, c in zip(premises, candidates, strict=True)]


_COORDINATION_WORDS = frozenset({"and", "or", "a", "an", "the", "another", "one", "other"})


def _coordinated(text_words: list[str], a: str, b: str) -> bool:
    """Whether only "and"/"or" and articles stand between ``a`` and ``b`` (each once in ``text_words``)."""
    i, j = sorted((text_words.index(a), text_words.index(b)))
    between = text_words[i + 1 : j]
    return bool({"and", "or"} & set(between)) and set(between) <= _COORDINATION_WORDS


def _base_words(text: str) -> list[str]:
    return [w[:-2] if w.endswith("'s") else w for w in words(text)]


class FluencyCheck:
    """Fails candidates whose mean token log-probability, as the policy's answer to the paraphrase prompt of
    their premise, is below ``min_logprob``."""

    reason = "candidate_disfluent"

    def __init__(self, model: Any, tokenizer: Any, *, template: str, chat: bool, min_logprob: float,
                 batch_size: int = 32) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template_text = resolve_template(template)[1]
        self.chat = chat
        self.min_logprob = min_logprob
        self.batch_size = batch_size

    @classmethod
    def load(cls, model: str, *, template: str, min_logprob: float, chat_template: str = "auto",
             dtype: str = "auto") -> FluencyCheck:
        lm, tokenizer = load_causal_lm(model, dtype=resolve_dtype(dtype, torch.device("cpu")))
        return cls(lm, tokenizer, template=template, chat=use_chat_template(chat_template, tokenizer),
                   min_logprob=min_logprob)

    @torch.inference_mode()
    def mean_logprobs(self, premises: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """Mean log-probability per candidate token (the end-of-turn token included when chatting)."""
        sequences, answer_lengths = [], []
        for premise, text in zip(premises, candidates, strict=True):
            prompt = self.tokenizer(paraphrase_prompt(premise, self.template_text, self.tokenizer, chat=self.chat),
                                    add_special_tokens=False)["input_ids"]
            answer = self.tokenizer(text + (self._end_of_turn() if self.chat else ""),
                                    add_special_tokens=False)["input_ids"]
            sequences.append(prompt + answer)
            answer_lengths.append(max(len(answer), 1))
        out = np.empty(len(sequences), dtype=np.float64)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            ids, mask = left_pad([sequences[i] for i in idx], self.tokenizer.pad_token_id, device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            token_logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
            for row, i in enumerate(idx):
                out[i] = float(token_logprobs[row, -answer_lengths[i]:].mean())
        return out

    def _end_of_turn(self) -> str:
        return self.tokenizer.eos_token or ""

    def failing(self, premises: Sequence[str], candidates: Sequence[str]) -> list[bool]:
        values = self.mean_logprobs(premises, candidates)
        return [not math.isfinite(v) or v < self.min_logprob for v in values]


def apply_checks(checks: Sequence[CandidateCheck], premises: Sequence[str],
                 candidates: Sequence[str]) -> list[str | None]:
    """The first failing check's reason per candidate (None: it passed every check); each check sees only the
    candidates that passed the ones before it."""
    reasons: list[str | None] = [None] * len(candidates)
    for check in checks:
        alive = [i for i, r in enumerate(reasons) if r is None]
        if not alive:
            break
        failed = check.failing([premises[i] for i in alive], [candidates[i] for i in alive])
        for i, bad in zip(alive, failed, strict=True):
            if bad:
                reasons[i] = check.reason
    return reasons


def plot_quality(scores: Sequence[float], drops: dict[str, int], path: Path, *, floor: float | None = None) -> None:
    """The card's quality plot: the score distribution of the sampled chosen answers (with the floor) and the
    drops by reason."""
    from sempa_train.stages.report import agg_pyplot

    plt = agg_pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.hist(list(scores), bins=30, color="tab:blue")
    if floor is not None:
        left.axvline(floor, color="tab:red", linestyle="--", label=f"floor {floor:g}")
        left.legend(loc="upper left")
    left.set_xlabel("chosen answer's score")
    left.set_ylabel("pairs")
    left.set_title(f"sampled chosen answers ({len(scores):,})")
    reasons = sorted(drops, key=drops.get)
    right.barh(reasons, [drops[r] for r in reasons], color="tab:grey")
    right.set_xlabel("dropped")
    right.set_title("drops by reason")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
