"""Minimal pairs for the NLI judge: a premise against a copy of itself with one detail changed.

A judge trained on SNLI and SICK alone learns that a hypothesis copying most of its premise is entailed
(the lexical-overlap shortcut of NLI models). The paraphrases a small model samples are exactly such near
copies, and what a reading of 100 kept pairs found wrong with them was one detail: a number, a colour or a
verb changed inside a copied sentence, an action dropped or a clause added (``docs/quality_sample*.md``).
These rules write that kind of pair from plain premises, with the label NLI gives it:

``swap`` (contradiction)
    one word of a closed class replaced by another of its class: numbers, colours, man/woman and the like,
    opposites (sitting/standing, inside/outside, ...).
``replace`` (neutral)
    one frequent content word replaced by another frequent word of the same form (``-ing`` for ``-ing``,
    a plural for a plural): "a boy walking on a trail" against "a boy playing on a trail".
``drop`` (neutral, shorter sentence first)
    an ``-ing`` word with the words after it up to the next preposition or comma removed: the shorter
    sentence does not entail the longer one (an action dropped or, read backwards, content added).
``singular`` (neutral)
    a plural noun made singular with its determiner and verb: "two dogs are running" against "a dog is
    running", "the mountains" against "the mountain".
``preposition`` (neutral)
    a preposition of place before an article replaced by another: "in front of the crosswalk" against "on
    the crosswalk" is the kind, "a man in the street" against "a man near the street" the rule.
``insert`` (neutral, premise first)
    an adjective added after an article, the article fixed for it: "a woman" against "a young woman".
``copy`` (entailment)
    the premise itself, and the premise with ``is``/``are`` before an ``-ing`` word removed, so the judge
    does not learn that every edit breaks entailment.

A premise gets at most one of ``singular``, ``preposition`` and ``insert`` (the kinds reading 3 found),
so the judge does not see many more changed pairs than entailed copies. The vocabulary of ``replace``
comes from the premises given (words seen at least ``min_count`` times), so
pairs built from the judge's own training premises never read an experiment's.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence

from sempa_train.core.text import WORD

ENTAILMENT, NEUTRAL, CONTRADICTION = 0, 1, 2

_GROUPS = (
    "one two three four five six seven eight nine ten",
    "red blue green yellow black white orange pink purple brown gray",
    "man woman", "men women", "boy girl", "boys girls", "male female", "father mother", "son daughter",
    "brother sister", "husband wife", "he she", "his her", "gentleman lady",
    "sitting standing", "sits stands", "inside outside", "indoors outdoors", "up down", "day night",
    "young old", "big small", "large small", "tall short", "empty full", "wet dry", "left right",
    "vertical horizontal", "front back", "asleep awake", "sleeping running", "above below", "open closed",
    "before after", "towards away", "smiling frowning", "laughing crying",
)
SWAPS: dict[str, list[str]] = {}
for _group in _GROUPS:
    _words = _group.split()
    for _word in _words:
        SWAPS.setdefault(_word, []).extend(w for w in _words if w != _word)

STOPWORDS = frozenset("""a an the and or but of in on at to from by with for into onto over under near next beside
behind above below up down out off as while when where who which that this these those there here is are was were
be been being has have had do does did it its he him his she her they them their we our you your i one some
someone something people person another other each all both any very just also not no so than then too can will
about around through across along against between among during after before""".split())
PREPOSITIONS = frozenset("in on at to from by with for into onto over under near behind through across along "
                         "while and as".split())
_ADJECTIVE_CONTEXT = frozenset("a an the of some two three four several many".split())
PLACE_PREPOSITIONS = ("in", "on", "near", "behind", "under", "beside", "inside", "across", "above")
_PLURAL_DETERMINERS = {"two": "a", "three": "a", "four": "a", "several": "a", "many": "a", "some": "a",
                       "the": "the", "these": "this", "those": "that"}
_PLURAL_ONLY = frozenset("jeans pants glasses sunglasses shorts clothes trousers scissors goggles stairs others"
                         .split())
_SINGULAR_VERBS = {"are": "is", "were": "was", "have": "has"}
ADJECTIVES = ("young", "old", "small", "large", "tall", "happy", "smiling", "angry", "little", "older")
_WORD = re.compile(WORD.pattern + r"|\S")  # a word (the candidate checks' definition) or a punctuation mark


def tokens(sentence: str) -> list[str]:
    """Words and punctuation marks of ``sentence``, in order."""
    return _WORD.findall(sentence)


def _spans(sentence: str) -> list[tuple[int, int]]:
    return [m.span() for m in _WORD.finditer(sentence)]


def _recase(word: str, like: str) -> str:
    return word.capitalize() if like[:1].isupper() else word


def _substitute(sentence: str, span: tuple[int, int], word: str) -> str:
    return sentence[:span[0]] + _recase(word, sentence[span[0]:span[1]]) + sentence[span[1]:]


def swap(sentence: str, rng: random.Random) -> str | None:
    """One closed-class word replaced by another of its class (None: the sentence has none)."""
    words, spans = tokens(sentence), _spans(sentence)
    spots = [i for i, w in enumerate(words) if w.lower() in SWAPS]
    if not spots:
        return None
    i = rng.choice(spots)
    return _substitute(sentence, spans[i], rng.choice(SWAPS[words[i].lower()]))


def _form(word: str) -> str:
    return "ing" if word.endswith("ing") else "s" if word.endswith("s") else ""


def content_vocabulary(premises: Sequence[str], min_count: int = 20) -> dict[str, list[str]]:
    """Frequent content words of ``premises`` grouped by form (``ing``, ``s``, other)."""
    counts = Counter(w.lower() for p in premises for w in tokens(p) if w.isalpha() and len(w) > 2)
    vocabulary: dict[str, list[str]] = {}
    for word, count in sorted(counts.items()):
        if count >= min_count and word not in STOPWORDS and word not in SWAPS:
            vocabulary.setdefault(_form(word), []).append(word)
    return vocabulary


def replace(sentence: str, vocabulary: dict[str, list[str]], rng: random.Random) -> str | None:
    """One frequent content word replaced by another frequent word of its form (None: no such word)."""
    words, spans = tokens(sentence), _spans(sentence)
    spots = [i for i, w in enumerate(words) if w.lower() in vocabulary.get(_form(w.lower()), ())]
    if not spots:
        return None
    i = rng.choice(spots)
    others = [w for w in vocabulary[_form(words[i].lower())] if w != words[i].lower()]
    return _substitute(sentence, spans[i], rng.choice(others)) if others else None


def drop(sentence: str, rng: random.Random) -> str | None:
    """An ``-ing`` word (not the first) and what follows it up to a preposition or punctuation removed."""
    words, spans = tokens(sentence), _spans(sentence)
    spots = [i for i, w in enumerate(words) if i > 0 and w.lower().endswith("ing") and len(w) > 4
             and words[i - 1].lower() not in _ADJECTIVE_CONTEXT]  # "of opposing teams": an adjective
    if not spots:
        return None
    i = rng.choice(spots)
    end = i + 1
    while end < len(words) and words[end].isalpha() and words[end].lower() not in PREPOSITIONS:
        end += 1
    start = i - 1 if words[i - 1].lower() in ("is", "are", "while", "and") else i
    if end < len(words) and not words[end].isalnum() and (start == 0 or not words[start - 1].isalnum()):
        end += 1  # "jeans, wearing a helmet, pauses": one comma stays; none at the start
    cut_from = spans[start - 1][1] if start > 0 else 0  # keep the text up to the last kept token
    cut_to = spans[end][0] if end < len(words) else len(sentence)
    gap = "" if cut_from == 0 or sentence[cut_to:cut_to + 1] in ("", ",", ".", ";", ":", "!", "?", ")") else " "
    shorter = sentence[:cut_from] + gap + sentence[cut_to:]
    return shorter if sum(w.isalpha() for w in tokens(shorter)) >= 3 else None


def _article(word: str, like: str) -> str:
    """``a`` or ``an`` for ``word``, in the case of ``like``."""
    return _recase("an" if word[:1].lower() in "aeiou" else "a", like)


def singular(sentence: str, known: set[str], rng: random.Random) -> str | None:
    """A plural noun after a determiner or a preposition made singular, with its determiner (or a new article)
    and a following is/are; the singular must be a word of the premises (``known``), so "glasses" never
    becomes "glasse"."""
    words, spans = tokens(sentence), _spans(sentence)
    before = set(_PLURAL_DETERMINERS) | (PREPOSITIONS - {"and", "as", "while"})
    spots = [i for i in range(1, len(words)) if words[i].lower().endswith("s") and len(words[i]) > 3
             and words[i].lower()[:-1] in known and words[i].lower() not in _PLURAL_ONLY
             and words[i - 1].lower() in before]
    if not spots:
        return None
    i = rng.choice(spots)
    noun = words[i][:-1]
    if i + 1 < len(words) and words[i + 1].lower() in _SINGULAR_VERBS:
        sentence = _substitute(sentence, spans[i + 1], _SINGULAR_VERBS[words[i + 1].lower()])
    determiner = _PLURAL_DETERMINERS.get(words[i - 1].lower())
    if determiner is None:  # "with guns": an article before the noun
        return sentence[:spans[i][0]] + _article(noun, "a") + " " + noun + sentence[spans[i][1]:]
    sentence = _substitute(sentence, spans[i], noun)
    return _substitute(sentence, spans[i - 1], _article(noun, "a") if determiner == "a" else determiner)


def preposition(sentence: str, rng: random.Random) -> str | None:
    """A preposition of place followed by an article replaced by another one (None: the sentence has none)."""
    words, spans = tokens(sentence), _spans(sentence)
    spots = [i for i in range(1, len(words) - 1) if words[i].lower() in PLACE_PREPOSITIONS
             and words[i + 1].lower() in ("a", "an", "the")]
    if not spots:
        return None
    i = rng.choice(spots)
    return _substitute(sentence, spans[i], rng.choice([p for p in PLACE_PREPOSITIONS if p != words[i].lower()]))


def insert(sentence: str, vocabulary: dict[str, list[str]], rng: random.Random) -> str | None:
    """An adjective added between an article and a frequent noun of the premises (None: no such noun)."""
    words, spans = tokens(sentence), _spans(sentence)
    nouns = set(vocabulary.get("", ()))
    spots = [i for i in range(len(words) - 1) if words[i].lower() in ("a", "an", "the")
             and words[i + 1].lower() in nouns]
    if not spots:
        return None
    i = rng.choice(spots)
    adjective = rng.choice([a for a in ADJECTIVES if a not in {w.lower() for w in words}])
    article = words[i] if words[i].lower() == "the" else _article(adjective, words[i])
    return sentence[:spans[i][0]] + article + " " + adjective + sentence[spans[i][1]:]


def light_copy(sentence: str) -> str:
    """The sentence with ``is``/``are`` before an ``-ing`` word removed (the same meaning)."""
    words, spans = tokens(sentence), _spans(sentence)
    for i in reversed(range(len(words) - 1)):
        if words[i].lower() in ("is", "are") and words[i + 1].lower().endswith("ing"):
            sentence = sentence[:spans[i][0]] + sentence[spans[i + 1][0]:]
    return sentence


def minimal_pairs(premises: Sequence[str], seed: int = 0,
                  vocabulary: dict[str, list[str]] | None = None) -> tuple[list[tuple[str, str]], list[int]]:
    """Labelled (sentence1, sentence2) minimal pairs of each distinct premise: a swap, a replacement and a drop
    where the premise allows them, one of a singular, a preposition change and an inserted adjective, and one
    entailed copy (alternately the premise itself and its light copy)."""
    rng = random.Random(seed)
    vocabulary = content_vocabulary(premises) if vocabulary is None else vocabulary
    known = {w.lower() for p in premises for w in tokens(p)}
    pairs: list[tuple[str, str]] = []
    labels: list[int] = []
    for n, premise in enumerate(dict.fromkeys(premises)):
        swapped, replaced, shorter = swap(premise, rng), replace(premise, vocabulary, rng), drop(premise, rng)
        if swapped is not None:
            pairs.append((premise, swapped))
            labels.append(CONTRADICTION)
        if replaced is not None:
            pairs.append((premise, replaced))
            labels.append(NEUTRAL)
        if shorter is not None:
            pairs.append((shorter, premise))
            labels.append(NEUTRAL)
        detail = [edited for edited in (singular(premise, known, rng), preposition(premise, rng),
                                        insert(premise, vocabulary, rng)) if edited is not None]
        if detail:
            pairs.append((premise, rng.choice(detail)))
            labels.append(NEUTRAL)
        copy = light_copy(premise) if n % 2 else premise
        pairs.append((premise, copy) if n % 4 < 2 else (copy, premise))
        labels.append(ENTAILMENT)
    return pairs, labels
