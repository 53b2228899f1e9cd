import json
from pathlib import Path

import numpy as np
import pytest

from sempa_train.stages.evaluation import evaluate_sts, format_table, paired_bootstrap, spearman100, task_metrics
from sempa_train.stages.sts_data import STS_SUBSETS, STSDataError, STSSubset, load_senteval_task, load_tasks


def make_senteval(root: Path) -> Path:
    """A tiny SentEval data/downstream folder with every task (3 scored pairs per subset)."""
    for task, subsets in STS_SUBSETS.items():
        folder = root / "STS" / f"{task}-en-test"
        folder.mkdir(parents=True)
        for sub in subsets:
            (folder / f"STS.input.{sub}.txt").write_text(
                f"{sub} a one\t{sub} b one\n{sub}  a two\t{sub} b two\nunscored a\tunscored b\n{sub} a 3\t{sub} b 3\n")
            (folder / f"STS.gs.{sub}.txt").write_text("1.0\n2.5\n\n4\n")
    stsb = root / "STS" / "STSBenchmark"
    stsb.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (stsb / f"sts-{split}.csv").write_text(
            "main-captions\tMSRvid\t2012test\t0001\t5.000\tA man plays.\tA man is playing.\n"
            "main-news\theadlines\t2013\t0002\t0.500\tIt \"rains\".\tThe sun shines.\textra\tcolumns\n")
    sick = root / "SICK"
    sick.mkdir()
    for name in ("SICK_train.txt", "SICK_trial.txt", "SICK_test_annotated.txt"):
        (sick / name).write_text(
            "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
            "1\tA dog runs.\tA dog is running.\t4.9\tENTAILMENT\n2\tA cat.\tA car.\t1.2\tNEUTRAL\n")
    return root


def test_senteval_loaders_follow_senteval(tmp_path):
    root = make_senteval(tmp_path)
    sts12 = load_senteval_task(root, "STS12")
    assert [s.name for s in sts12] == list(STS_SUBSETS["STS12"])
    first = sts12[0]
    assert first.sent1 == ["MSRpar a one", "MSRpar a two", "MSRpar a 3"]  # empty gold skipped, spaces joined
    assert first.scores.tolist() == [1.0, 2.5, 4.0]
    stsb = load_senteval_task(root, "STSBenchmark", "dev")[0]
    assert (stsb.sent1, stsb.sent2, stsb.scores.tolist()) == (
        ["A man plays.", 'It "rains".'], ["A man is playing.", "The sun shines."], [5.0, 0.5])
    assert stsb.genres == ("main-captions", "main-news") and stsb.sources == ("MSRvid", "headlines")
    second = stsb.select([1])  # a subset keeps each pair's sentences, score, genre and source together
    assert (second.sent1, second.sent2, second.scores.tolist(), second.genres, second.sources) == (
        ['It "rains".'], ["The sun shines."], [0.5], ("main-news",), ("headlines",))
    sick = load_senteval_task(root, "SICKRelatedness", "test")[0]
    assert sick.sent2 == ["A dog is running.", "A car."] and sick.scores.tolist() == [4.9, 1.2]


def test_malformed_files_name_file_and_line(tmp_path):
    root = make_senteval(tmp_path)
    (root / "STS" / "STSBenchmark" / "sts-dev.csv").write_text("a\tb\tc\td\tx\ts1\ts2\n")
    with pytest.raises(STSDataError, match=r"sts-dev\.csv:1: score 'x' is not a number"):
        load_senteval_task(root, "STSBenchmark", "dev")
    (root / "STS" / "STS13-en-test" / "STS.gs.FNWN.txt").write_text("1\n")
    with pytest.raises(STSDataError, match=r"STS\.input\.FNWN\.txt: 4 lines but .*STS\.gs\.FNWN\.txt has 1"):
        load_senteval_task(root, "STS13")
    with pytest.raises(STSDataError, match=r"SICK_test_annotated\.txt: missing"):
        load_senteval_task(tmp_path / "STS", "SICKRelatedness", "test")


def test_pooled_weighted_and_subset_scores_by_hand():
    a = STSSubset("T", "a", "test", ["x"] * 3, ["y"] * 3, np.array([1.0, 2.0, 3.0]))
    b = STSSubset("T", "b", "test", ["x"] * 2, ["y"] * 2, np.array([1.0, 2.0]))
    m = task_metrics([a, b], [np.array([0.1, 0.2, 0.3]), np.array([0.9, 0.8])])
    assert m["subsets"]["a"]["spearman"] == pytest.approx(100.0)
    assert m["subsets"]["b"]["spearman"] == pytest.approx(-100.0)
    # pooled ranks: sims 1,2,3,5,4 vs gold ranks 1.5,3.5,5,1.5,3.5 → correlation 0
    assert m["spearman"] == pytest.approx(0.0, abs=1e-9)
    assert m["wmean"] == pytest.approx((100 * 3 - 100 * 2) / 5)
    assert m["n"] == 5
    assert spearman100(np.array([1.0, 1.0]), np.array([1.0, 2.0])) == 0.0


class TableEncoder:
    """Fake encoder: a fixed 2-d vector per sentence."""

    name = "table"

    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.calls = 0

    def encode(self, sentences):
        self.calls += 1
        return np.array([self.table[s] for s in sentences], dtype=np.float32)


def test_evaluate_sts_contract(tmp_path):
    root = make_senteval(tmp_path)
    tasks = load_tasks(("STSBenchmark", "SICKRelatedness"), "dev", root)
    vectors = {"A man plays.": [1, 0], "A man is playing.": [1, 0.1], 'It "rains".': [1, 0],
               "The sun shines.": [0, 1], "A dog runs.": [1, 1], "A dog is running.": [1, 1.1],
               "A cat.": [1, 0], "A car.": [-1, 1]}
    encoder = TableEncoder(vectors)
    results = evaluate_sts(encoder, tasks)
    assert encoder.calls == 1  # every sentence of every task in one call
    assert results["tasks"]["STSBenchmark"] == {"spearman": pytest.approx(100.0), "n": 2, "split": "dev"}
    assert results["tasks"]["SICKRelatedness"]["spearman"] == pytest.approx(100.0)
    assert results["avg"] == pytest.approx(100.0) and results["primary_metric"] == "avg"
    json.dumps(results)  # the contract is JSON-serialisable
    table = format_table(results, compare=results)
    assert "STSBenchmark" in table and "+0.00" in table


def test_paired_bootstrap_separates_a_real_change_from_none():
    rng = np.random.default_rng(1)
    gold = rng.uniform(0, 5, 400)
    noisy = gold + rng.normal(0, 2.0, 400)
    assert paired_bootstrap(gold, noisy, noisy, samples=200) == (0.0, 0.0)  # same model: no change at all
    low, high = paired_bootstrap(gold, noisy, gold + rng.normal(0, 0.5, 400), samples=200)
    assert 0 < low < high  # a much better model: the whole interval is above zero
    low, high = paired_bootstrap(gold, noisy, noisy + rng.normal(0, 0.3, 400), samples=200)
    assert low < 0 < high  # a small perturbation: the interval straddles zero
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap(gold, noisy[:10], noisy)
