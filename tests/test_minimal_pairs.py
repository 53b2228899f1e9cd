"""Minimal pairs for the judge: one detail changed, with the label NLI gives it; built only from the premises
the judge may train on."""

from __future__ import annotations

import random

from sempa_train.stages.minimal_pairs import (
    CONTRADICTION,
    ENTAILMENT,
    NEUTRAL,
    SWAPS,
    content_vocabulary,
    drop,
    insert,
    light_copy,
    minimal_pairs,
    preposition,
    replace,
    singular,
    swap,
    tokens,
)

PREMISE = "Two women in red shirts are walking a dog, holding hands, on the beach."


def changed_words(a: str, b: str) -> list[tuple[str, str]]:
    return [(x, y) for x, y in zip(tokens(a), tokens(b), strict=True) if x != y]


def test_a_swap_changes_one_closed_class_word_to_another_of_its_class():
    for seed in range(20):
        swapped = swap(PREMISE, random.Random(seed))
        [(old, new)] = changed_words(PREMISE, swapped)
        assert new.lower() in SWAPS[old.lower()] and new[0].isupper() == old[0].isupper()
    assert swap("A cat naps.", random.Random(0)) is None


def test_a_replacement_keeps_the_form_of_the_word_it_replaces():
    vocabulary = {"ing": ["walking", "playing"], "s": ["shirts", "hats"], "": ["beach", "park"]}
    for seed in range(20):
        [(old, new)] = changed_words(PREMISE, replace(PREMISE, vocabulary, random.Random(seed)))
        assert old != new and (old.endswith("ing") == new.endswith("ing"))
    assert content_vocabulary(["A dog runs in the park."] * 3, min_count=3) == {"s": ["runs"], "": ["dog", "park"]}


def test_a_drop_removes_an_action_with_its_object_and_keeps_the_punctuation_right():
    assert drop("A man in blue jeans, wearing a black helmet, pauses to drink.", random.Random(0)) == \
        "A man in blue jeans, pauses to drink."
    assert drop("A boy is bowling in a hallway.", random.Random(0)) == "A boy in a hallway."
    assert drop("Two boys of opposing teams play.", random.Random(0)) is None  # an adjective, not an action
    assert light_copy("A boy is bowling and girls are singing.") == "A boy bowling and girls singing."


def test_minimal_pairs_label_each_edit_and_put_the_shorter_sentence_first():
    pairs, labels = minimal_pairs([PREMISE] * 30 + ["A boy is bowling in a hallway."] * 30, seed=1)
    by_label = {label: [p for p, lab in zip(pairs, labels, strict=True) if lab == label]
                for label in (ENTAILMENT, NEUTRAL, CONTRADICTION)}
    assert len(by_label[ENTAILMENT]) == 2  # one entailed copy per distinct premise
    assert all(len(changed_words(a, b)) == 1 for a, b in by_label[CONTRADICTION])
    shorter = [(a, b) for a, b in by_label[NEUTRAL] if len(a) < len(b)]
    assert ("A boy in a hallway.", "A boy is bowling in a hallway.") in shorter
    assert minimal_pairs([PREMISE], seed=1) == minimal_pairs([PREMISE], seed=1)


def test_a_drop_at_the_start_leaves_no_dangling_comma():
    assert drop("While running fast, the boy smiles at a dog.", random.Random(0)) == "the boy smiles at a dog."


def test_a_singular_fixes_its_determiner_and_verb_and_needs_a_known_singular():
    known = {"dog", "mountain", "glasse", "instrument"}
    assert singular("Two dogs are running.", known, random.Random(0)) == "A dog is running."
    assert singular("The dogs are running.", known, random.Random(0)) == "The dog is running."
    assert singular("A hiker high in mountains.", known, random.Random(0)) == "A hiker high in a mountain."
    assert singular("He plays with instruments.", known, random.Random(0)) == "He plays with an instrument."
    assert singular("A man with glasses.", known, random.Random(0)) is None  # plural only
    assert singular("Two cats are running.", known, random.Random(0)) is None  # "cat" not known


def test_a_preposition_change_and_an_inserted_adjective_change_one_spot():
    for seed in range(10):
        [(old, new)] = changed_words(PREMISE, preposition(PREMISE, random.Random(seed)))
        assert old in ("in", "on") and new != old
    assert preposition("A cat naps in it.", random.Random(0)) is None  # no article after the preposition
    for seed in range(10):
        inserted = insert("A woman walks a dog on the beach.", {"": ["woman", "beach"]}, random.Random(seed))
        added = [w for w in tokens(inserted) if w.lower() not in {"a", "an", "woman", "walks", "dog", "on", "the",
                                                                   "beach", "."}]
        assert len(added) == 1 and len(tokens(inserted)) == 10
        article = tokens(inserted)[tokens(inserted).index(added[0]) - 1]
        assert article.lower() in ("the", "an" if added[0][0] in "aeiou" else "a")
