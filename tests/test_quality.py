"""Absolute checks of sampled candidates: language, fluency, the chosen-score floor; each drop counted."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from conftest import write_jsonl
from test_ranking import P1, P2, TableScorer, candidates_df, triples_df

from sempa_train.core.config import RankConfig
from sempa_train.core.summary import worst_chosen
from sempa_train.stages.quality import (
    FluencyCheck,
    LanguageCheck,
    MetaAnswerCheck,
    apply_checks,
    foreign_letter_share,
)
from sempa_train.stages.ranking import rank_preferences

GIBBERISH = "Messingi wesner di marina fi, sjık, hghd in ochik med lucky diffratul piano."
MIXED = 'Spanišiština odleglosuna povďća: "A man in a red coat is walking his dog along the beach."'


class SetCheck:
    """A check that fails the texts of a fixed set (stands in for a model-based one)."""

    def __init__(self, reason: str, bad: set[str]):
        self.reason, self.bad, self.seen = reason, bad, []

    def failing(self, premises, candidates):
        self.seen += list(candidates)
        return [c in self.bad for c in candidates]


def test_language_check_flags_other_languages_and_mixed_scripts_not_short_english():
    check = LanguageCheck("en")
    assert check.failing([P1] * 3, ["Un homme joue de la guitare sur la scène.", MIXED, "Der Mann spielt Gitarre."]) \
        == [True, True, True]
    english = ["A boy jumps.", "A person surfs.", "Girls ride ATVs.", "Two men play basketball.", "Bacon."]
    assert check.failing([P1] * len(english), english) == [False] * len(english)
    assert foreign_letter_share("Café au lait") == pytest.approx(1 / 10)


def test_meta_answers_are_flagged_and_paraphrases_are_not():
    premise = "Two men performing in a music group."
    meta = ['Rearrange the sentence to "Two men performing in a music group."',
            'The sentence is "Two men perform in a band."', "Sure, here it is. Two men perform in a band.",
            "Two men performing in a music group: Two men performing in a music group", "Paraphrase: Two men sing."]
    fine = ["Two men perform in a band.", "Two men are performing in a musical group.",
            "The two men play in a band.", "Sentences aside, two men perform in a group."]
    check = MetaAnswerCheck()
    assert check.failing([premise] * len(meta), meta) == [True] * len(meta)
    assert check.failing([premise] * len(fine), fine) == [False] * len(fine)
    quoted = 'A sign reads "open" in front of a store.'  # quotes the premise has are fine
    assert check.failing([quoted], ['A sign saying "open" hangs in front of a store.']) == [False]


def test_a_misspelt_merged_or_garbled_new_word_is_flagged_and_copied_rare_words_are_not():
    from sempa_train.stages.quality import SpellingCheck

    premise = "Seven people ride motorbikes past the Sol Septu stall."
    candidates = ["Seven people ride motbikes past the Sol Septu stall.", "A militarywoman rides past a stall.",
                  "Seven people are riding motorbikes past the Sol Septu stall.", "Seven riders pass a spigot."]
    assert SpellingCheck().failing([premise] * 4, candidates) == [True, True, False, False]


def test_a_number_the_premise_has_less_often_is_flagged():
    from sempa_train.stages.quality import NumberCheck

    premise = "Three people are standing on a pier between two boats."
    candidates = ["Two people are standing on a pier between two boats.", "3 people stand on a pier.",
                  "People stand on a pier between two boats.", "Three people stand between 2 boats."]
    assert NumberCheck().failing([premise] * 4, candidates) == [True, True, False, True]
    # a word made singular or plural changes how many there are too; other new words do not
    premise = "A lady holds a piece of paper in her hands near the glasses."
    candidates = ["A lady holds paper in her hand near the glasses.", "A lady holds a piece of paper in her hands "
                  "near the glass.", "A woman holds a sheet of paper in her hands near the glasses.",
                  "A lady holding a piece of paper in her hands, near glasses."]
    assert NumberCheck().failing([premise] * 4, candidates) == [True, True, False, False]


def test_a_sentence_repeated_inside_itself_or_made_a_definition_is_flagged():
    from sempa_train.stages.quality import RepetitionCheck

    premise = "A person performs a snowboarding trick on a rail as a man crouches down."
    candidates = ["A person performs a snowboarding trick on a rail while a person performs a snowboarding trick.",
                  "A person does a snowboard trick on a rail as a man crouches.",
                  "A person performs a snowboarding trick on a rail, a man crouching down."]
    assert RepetitionCheck().failing([premise] * 3, candidates) == [True, False, False]
    assert RepetitionCheck.repeated("A family day at the beach.", "A family day at the beach is a family day.") \
        == [("a", "family", "day")]
    # a phrase the premise itself says twice may stay twice
    assert RepetitionCheck().failing(["A man in red and a man in blue."], ["A man in blue and a man in red."]) \
        == [False]


def test_two_people_in_swapped_roles_are_flagged_and_a_passive_is_not():
    from sempa_train.stages.quality import RoleSwapCheck

    premise = "The woman is adjusting a flower on the man's lapel."
    candidates = ["The man is adjusting a flower on the woman's lapel.",
                  "A woman adjusts a flower on a man's lapel.",
                  "On the man's lapel, the woman is adjusting a flower.",  # reordered, roles kept: still flagged
                  "The man's lapel flower is being adjusted by the woman."]
    assert RoleSwapCheck().failing([premise] * 4, candidates) == [True, False, True, False]
    assert RoleSwapCheck.swapped(premise, candidates[0]) == [("woman", "man")]
    # other words moving around is not a swapped role
    assert RoleSwapCheck().failing(["Man relaxing on a bench at the bus stop."],
                                   ["On a bench at the bus stop, man relaxing."]) == [False]
    # two people joined by "and" have no roles to swap; one acting on the other does
    assert RoleSwapCheck().failing(["A man and a woman are competing.", "A man is chasing a woman."],
                                   ["A woman and a man are competing.", "A woman is chasing a man."]) == [False, True]


def test_the_rank_config_turns_the_text_checks_on_in_order_cheapest_first():
    from sempa_train.stages.ranking import build_checks

    assert build_checks(RankConfig()) == []
    cfg = RankConfig(drop_meta_answers=True, language="en", drop_unknown_words=True, drop_number_changes=True,
                     drop_repetitions=True, drop_swapped_roles=True)
    assert [c.reason for c in build_checks(cfg)] == [
        "candidate_meta_answer", "candidate_not_english", "candidate_unknown_word", "candidate_changed_number",
        "candidate_repeats", "candidate_swapped_roles"]


def test_checks_run_in_order_on_survivors_and_name_the_first_failure():
    first, second = SetCheck("a", {"x"}), SetCheck("b", {"x", "y"})
    assert apply_checks([first, second], ["p"] * 3, ["x", "y", "z"]) == ["a", "b", None]
    assert second.seen == ["y", "z"]  # the second check never sees what the first dropped


def test_each_bad_candidate_is_dropped_with_its_reason_and_hybrid_falls_back_to_gold():
    cands = candidates_df([
        ("p1", P1, "", "stop"),                                   # empty
        ("p1", P1, "Un homme joue de la guitare sur scène.", "stop"),  # another language
        ("p1", P1, GIBBERISH, "stop"),                            # word salad (the fluency check)
        ("p1", P1, "A man is not playing any guitar on stage.", "stop"),  # negated: scores below the floor
        ("p2", P2, "Two dogs are running over a field of snow.", "stop"),
    ])
    scores = {"A man is not playing any guitar on stage.": 0.3, "Two dogs are running over a field of snow.": 0.9,
              "Un homme joue de la guitare sur scène.": 0.95, GIBBERISH: 0.96}
    cfg = RankConfig(strategy="hybrid", hybrid_fraction=1.0, min_chosen_score=0.5, min_length_ratio=0.0,
                     max_length_ratio=10.0)
    ranked = rank_preferences(cfg, triples=triples_df(), candidates=cands, scorer=TableScorer(scores),
                              checks=[LanguageCheck("en"), SetCheck("candidate_disfluent", {GIBBERISH})])
    assert ranked.drops == {"candidate_empty": 1, "candidate_not_english": 1, "candidate_disfluent": 1,
                            "chosen_below_floor": 1, "hybrid_fallback_to_gold": 1}
    rows = {r["premise_id"]: r for r in ranked.table.iter_rows(named=True)}
    assert rows["p1"]["chosen_origin"] == "gold" and rows["p1"]["chosen"] == "A man plays music."
    assert rows["p2"]["chosen"] == "Two dogs are running over a field of snow."
    # with the sampled strategy a premise without an acceptable candidate is dropped, not filled with gold
    sampled = rank_preferences(cfg.replace(strategy="sampled"), triples=triples_df(), candidates=cands,
                               scorer=TableScorer(scores),
                               checks=[LanguageCheck("en"), SetCheck("candidate_disfluent", {GIBBERISH})])
    assert sampled.table["premise_id"].to_list() == ["p2"]
    assert sampled.drops["chosen_below_floor"] == 1 and "hybrid_fallback_to_gold" not in sampled.drops


def test_fluency_is_the_mean_log_prob_of_the_answer_tokens(tiny_model_dir):
    import torch

    from sempa_train.core.models import load_causal_lm
    from sempa_train.core.text import paraphrase_prompt

    lm, tok = load_causal_lm(str(tiny_model_dir))
    check = FluencyCheck(lm, tok, template="P1", chat=False, min_logprob=-5.0)
    premises, texts = [P1, P2], ["A man plays a guitar.", "Dogs run in the snow today."]
    values = check.mean_logprobs(premises, texts)
    prompt = tok(paraphrase_prompt(P2, check.template_text, tok, chat=False), add_special_tokens=False)["input_ids"]
    answer = tok(texts[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([prompt + answer])).logits[0, :-1]
    manual = torch.log_softmax(logits, -1).gather(-1, torch.tensor(prompt + answer)[1:, None])[-len(answer):].mean()
    assert values[1] == pytest.approx(float(manual), abs=1e-4)
    assert check.failing(premises, texts) == list(values < -5.0)
    assert np.all(values < 0)


def test_inspect_worst_lists_the_lowest_scoring_chosen_answers(tmp_path):
    from sempa_train.core.io import write_dataset

    ranked = rank_preferences(RankConfig(strategy="sampled", min_length_ratio=0.0, max_length_ratio=10.0),
                              triples=triples_df(), scorer=TableScorer({"A guitarist plays.": 0.2,
                                                                        "Dogs run on snow.": 0.8}),
                              candidates=candidates_df([("p1", P1, "A guitarist plays.", "stop"),
                                                        ("p2", P2, "Dogs run on snow.", "stop")]))
    write_dataset(tmp_path / "prefs", ranked.table, kind="preferences", config={"scorer_used": "table"}, source="x")
    text = worst_chosen(tmp_path / "prefs", 1)
    assert "0.200  premise: " + P1 in text and "A guitarist plays." in text and "Dogs run" not in text
    write_dataset(tmp_path / "triples", triples_df(), kind="triples", config={}, source="x")
    with pytest.raises(ValueError, match="needs a preference dataset"):
        worst_chosen(tmp_path / "triples", 1)


def test_the_card_has_a_quality_section(tmp_path):
    from sempa_train.core.io import read_manifest, write_dataset
    from sempa_train.stages.ranking import rank

    write_dataset(tmp_path / "triples", triples_df(), kind="triples", config={}, source="x")
    write_dataset(tmp_path / "cands", candidates_df([
        ("p1", P1, "Un homme joue de la guitare sur la scène.", "stop"),
        ("p1", P1, "A man plays a guitar on a stage.", "stop"),
        ("p2", P2, "Two dogs are running over a field of snow.", "stop")]), kind="candidates", config={}, source="x")
    cfg = RankConfig(strategy="sampled", language="en", min_length_ratio=0.0, max_length_ratio=10.0)
    scorer = TableScorer({"A man plays a guitar on a stage.": 0.9, "Two dogs are running over a field of snow.": 0.7})
    rank(cfg, tmp_path / "prefs", triples=tmp_path / "triples", candidates=tmp_path / "cands", scorer=scorer)
    quality = read_manifest(tmp_path / "prefs")["quality"]
    assert quality["candidate_not_english (share of checked candidates)"] == pytest.approx(1 / 3, abs=1e-3)
    assert quality["chosen score, 50% quantile"] in (0.7, 0.9)
    assert "## Quality" in (tmp_path / "prefs" / "README.md").read_text()
    assert (tmp_path / "prefs" / "quality.png").stat().st_size > 0
    assert "![quality.png](quality.png)" in (tmp_path / "prefs" / "README.md").read_text()


class TableJudge:
    """Stands in for the NLI judge: fixed entailment probabilities per (premise, hypothesis)."""

    def __init__(self, entailment: dict[tuple[str, str], float]):
        self.entailment = entailment

    def probabilities(self, pairs):
        p = np.array([self.entailment.get(pair, 0.9) for pair in pairs])
        return np.stack([p, (1 - p) / 2, (1 - p) / 2], axis=1)


def test_the_judge_drops_a_negated_meaning_in_either_direction():
    from sempa_train.stages.judge import JudgeCheck

    negated, narrower = "A man is not playing a guitar on stage.", "A man plays."
    judge = TableJudge({(P1, negated): 0.02, (narrower, P1): 0.1})  # the premise does not follow from "A man plays."
    assert JudgeCheck(judge).failing([P1] * 3, [negated, narrower, "A guitarist plays on stage."]) == \
        [True, True, False]


def test_a_missing_judge_says_how_to_build_it_and_a_built_one_is_reused(tmp_path, monkeypatch):
    from sempa_train.stages.judge import JUDGE_NAME, NLIJudge, build_judge, judge_folder, resolve_judge

    monkeypatch.setenv("SEMPA_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"sempa-nli-minilm.*is not built.*sempa judge build --sick"):
        resolve_judge(JUDGE_NAME)
    sick = tmp_path / "SICK_train.txt"
    rows = [("A man plays a guitar.", "A man plays an instrument.", "ENTAILMENT"),
            ("A man plays a guitar.", "A woman sleeps.", "CONTRADICTION"),
            ("A dog runs.", "A dog runs in a park.", "NEUTRAL")] * 6
    sick.write_text("pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
                    + "".join(f"{i}\t{a}\t{b}\t3.0\t{label}\n" for i, (a, b, label) in enumerate(rows)))
    record = build_judge(sick, epochs=1, batch_size=8)
    assert record["train"]["pairs"] == 18 and "SICK train only" in record["split"]
    folder = judge_folder()
    assert resolve_judge(JUDGE_NAME) == folder and (folder / "judge.json").is_file()
    probs = NLIJudge.load(JUDGE_NAME).probabilities([("A man plays a guitar.", "A man plays an instrument.")])
    assert probs.shape == (1, 3) and probs.sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_judge(sick, epochs=1)

    # SNLI-dev pairs join the training data, except those of the premises an experiment will judge
    from sempa_train.core.io import write_dataset

    dev = write_jsonl(tmp_path / "dev.jsonl", [{"premise": P1, "hypothesis": "A man plays music.", "label": 0},
                                                {"premise": P2, "hypothesis": "Dogs are outside.", "label": 0},
                                                {"premise": P2, "hypothesis": "Cats sit inside.", "label": 2}])
    write_dataset(tmp_path / "triples", triples_df().filter(pl.col("premise") == P2), kind="triples", config={},
                  source="x")
    record = build_judge(sick, tmp_path / "judge2", epochs=1, batch_size=8, snli_dev=dev,
                         exclude=[tmp_path / "triples"])
    assert record["train"]["pairs"] == 19 and record["train"]["snli_dev"]["pairs"] == 1
    assert "outside 1 excluded premises" in record["split"]

    # minimal pairs come from the SNLI-dev premises the judge trains on, never from the excluded ones
    with pytest.raises(ValueError, match="--snli-dev"):
        build_judge(sick, tmp_path / "judge3", epochs=1, with_minimal_pairs=True)
    record = build_judge(sick, tmp_path / "judge3", epochs=1, batch_size=8, snli_dev=dev,
                         exclude=[tmp_path / "triples"], with_minimal_pairs=True)
    from sempa_train.stages.minimal_pairs import minimal_pairs

    assert record["train"]["minimal_pairs"] == len(minimal_pairs([P1])[0]) >= 2  # P1's only: P2 is excluded
    assert record["train"]["pairs"] == 19 + record["train"]["minimal_pairs"]
    assert "minimal pairs of those premises" in record["split"]

    # assessed on an SNLI-format file: 3-class accuracy and the minimal pairs of its premises
    from sempa_train.stages.judge import assess_judge

    assessed = assess_judge(NLIJudge.load(str(tmp_path / "judge3")), dev)
    assert assessed["snli_test"]["pairs"] == 3 and 0 <= assessed["snli_test"]["accuracy"] <= 1
    assert assessed["snli_test_minimal_pairs"]["pairs"] == len(minimal_pairs([P1, P2])[0])
