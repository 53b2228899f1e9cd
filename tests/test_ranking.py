import numpy as np
import polars as pl
import pytest

from sempa_train.core.config import RankConfig
from sempa_train.core.io import read_dataset, write_dataset
from sempa_train.core.schemas import CANDIDATES_SCHEMA, TRIPLES_SCHEMA
from sempa_train.core.text import normalize_text
from sempa_train.stages.ranking import filter_candidates, pick_pair, rank, rank_preferences
from sempa_train.stages.scoring import EmbeddingScorer, entailment_index

P1 = "A man is playing a guitar on stage."
P2 = "Two dogs run across a snowy field."


class TableScorer:
    """Fake scorer: a fixed score per candidate text (0.0 when unknown)."""

    name = "table"

    def __init__(self, scores: dict[str, float]):
        self.scores = scores
        self.calls = 0

    def score(self, premises, candidates):
        self.calls += 1
        return np.array([self.scores.get(c, 0.0) for c in candidates])


def triples_df() -> pl.DataFrame:
    return pl.DataFrame(
        [
            {"premise_id": "p1", "premise": P1, "entailment": "A man plays music.", "contradiction": "A man sleeps.",
             "source": "nli.jsonl", "entailment_row": 0, "contradiction_row": 2},
            {"premise_id": "p2", "premise": P2, "entailment": "Dogs are outside.", "contradiction": "Cats sit inside.",
             "source": "nli.jsonl", "entailment_row": 3, "contradiction_row": 5},
        ],
        schema=TRIPLES_SCHEMA,
    )


def candidates_df(rows: list[tuple[str, str, str, str]]) -> pl.DataFrame:
    """rows: (premise_id, premise, text, finish_reason)."""
    return pl.DataFrame(
        [{"premise_id": pid, "premise": premise, "candidate_idx": i, "text": text, "raw_text": text,
          "finish_reason": reason, "prompt_tokens": 10, "completion_tokens": 8, "backend": "transformers",
          "model": "tiny", "template_id": "P1", "temperature": 1.0, "top_p": 0.95, "max_tokens": 64, "seed": 1}
         for i, (pid, premise, text, reason) in enumerate(rows)],
        schema=CANDIDATES_SCHEMA,
    )


CANDIDATES = candidates_df([
    ("p1", P1, "A man plays a guitar on a stage.", "stop"),  # best
    ("p1", P1, "a man is playing a guitar on stage", "stop"),  # copy after normalisation
    ("p1", P1, "", "stop"),  # empty
    ("p1", P1, "A guitarist performs on stage for the crowd tonight and", "length"),  # truncated
    ("p1", P1, "Guitar.", "stop"),  # too short
    ("p1", P1, "A man plays a guitar on a stage!", "stop"),  # duplicate of the first after normalisation
    ("p1", P1, "Someone performs music with a guitar.", "stop"),  # worst kept
    ("p2", P2, "Dogs.", "stop"),  # too short → p2 has nothing usable
])
SCORES = {"A man plays a guitar on a stage.": 0.9, "Someone performs music with a guitar.": 0.6,
          "A man plays music.": 0.7, "A man sleeps.": 0.2, "Dogs are outside.": 0.5, "Cats sit inside.": 0.1}


def test_normalize_and_filters_by_hand():
    assert normalize_text("  A man, PLAYING a guitar! ") == "a man playing a guitar"
    texts = list(zip(CANDIDATES["text"][:7], CANDIDATES["finish_reason"][:7], strict=True))
    kept, drops = filter_candidates(P1, texts, RankConfig())
    assert kept == ["A man plays a guitar on a stage.", "Someone performs music with a guitar."]
    assert dict(drops) == {"candidate_copy": 1, "candidate_empty": 1, "candidate_truncated": 1,
                           "candidate_length_ratio": 1, "candidate_duplicate": 1}
    kept, _ = filter_candidates(P1, texts, RankConfig(drop_truncated=False, max_length_ratio=3.0))
    assert "A guitarist performs on stage for the crowd tonight and" in kept


def test_pick_pair():
    assert pick_pair([0.2, 0.9, 0.5]) == (1, 0)
    assert pick_pair([0.5, 0.5]) is None
    assert pick_pair([0.7]) is None


def test_sampled_with_contradiction():
    scorer = TableScorer(SCORES)
    ranked = rank_preferences(RankConfig(strategy="sampled"), triples=triples_df(), candidates=CANDIDATES,
                              scorer=scorer)
    assert scorer.calls == 1
    row = ranked.table.row(0, named=True)
    assert ranked.table.height == 1
    assert (row["chosen"], row["rejected"]) == ("A man plays a guitar on a stage.", "A man sleeps.")
    assert (row["chosen_origin"], row["rejected_origin"], row["strategy"]) == ("sampled", "gold", "sampled")
    assert row["chosen_score"] == 0.9 and row["rejected_score"] == 0.2 and row["margin"] == pytest.approx(0.7)
    assert row["prompt"] == f'Keep the same meaning of this sentence: "{P1}", while making some changes.'
    assert row["rejected_row"] == 2 and row["chosen_row"] is None
    assert ranked.drops["premise_no_valid_candidate"] == 1 and ranked.drops["candidate_length_ratio"] == 2


def test_sampled_with_worst_candidate_needs_no_triples():
    ranked = rank_preferences(RankConfig(strategy="sampled", rejected="worst"), triples=None, candidates=CANDIDATES,
                              scorer=TableScorer(SCORES))
    row = ranked.table.row(0, named=True)
    assert (row["chosen"], row["rejected"]) == ("A man plays a guitar on a stage.",
                                                "Someone performs music with a guitar.")
    assert row["rejected_origin"] == "sampled" and row["margin"] == pytest.approx(0.3)
    assert ranked.drops["premise_too_few_candidates"] == 1


def test_gold_and_hybrid():
    gold = rank_preferences(RankConfig(strategy="gold"), triples=triples_df(), candidates=None,
                            scorer=TableScorer(SCORES))
    assert gold.table["chosen"].to_list() == ["A man plays music.", "Dogs are outside."]
    assert gold.table["margin"].to_list() == pytest.approx([0.5, 0.4])

    hybrid = rank_preferences(RankConfig(strategy="hybrid", hybrid_fraction=1.0), triples=triples_df(),
                              candidates=CANDIDATES, scorer=TableScorer(SCORES))
    assert hybrid.table["chosen_origin"].to_list() == ["sampled", "gold"]  # p2 has no usable candidate
    assert hybrid.drops["hybrid_fallback_to_gold"] == 1
    none = rank_preferences(RankConfig(strategy="hybrid", hybrid_fraction=0.0), triples=triples_df(),
                            candidates=CANDIDATES, scorer=TableScorer(SCORES))
    assert none.table["chosen_origin"].to_list() == ["gold", "gold"]

    entail = 'Write a sentence that is true whenever this one is: "{sentence}"'
    mixed = rank_preferences(RankConfig(strategy="hybrid", hybrid_fraction=1.0, gold_template=entail),
                             triples=triples_df(), candidates=CANDIDATES, scorer=TableScorer(SCORES))
    sampled_row, gold_row = mixed.table.iter_rows(named=True)
    assert sampled_row["template_id"] == "P1" and sampled_row["prompt"].startswith("Keep the same meaning")
    assert gold_row["template_id"] == "custom" and gold_row["prompt"].startswith("Write a sentence that is true")


def test_margin_and_contamination_filters():
    ranked = rank_preferences(RankConfig(strategy="gold", min_margin=0.45), triples=triples_df(), candidates=None,
                              scorer=TableScorer(SCORES))
    assert ranked.table["premise_id"].to_list() == ["p1"] and ranked.drops == {"pair_margin": 1}
    ranked = rank_preferences(RankConfig(strategy="gold"), triples=triples_df(), candidates=None, scorer=None,
                              contamination=frozenset({normalize_text("Cats sit inside")}))
    assert ranked.table["premise_id"].to_list() == ["p1"] and ranked.drops == {"pair_contamination": 1}
    assert ranked.table["chosen_score"].to_list() == [None]


def test_rank_stage_writes_a_dataset_and_refuses_bad_input(tmp_path):
    write_dataset(tmp_path / "triples", triples_df(), kind="triples", config={}, source="nli.jsonl")
    write_dataset(tmp_path / "cand", CANDIDATES, kind="candidates", config={}, source="triples")
    result = rank(RankConfig(strategy="sampled"), tmp_path / "prefs", triples=tmp_path / "triples",
                  candidates=tmp_path / "cand", scorer=TableScorer(SCORES))
    table = read_dataset(result.out_dir, "preferences")
    assert table.height == 1
    card = (result.out_dir / "README.md").read_text()
    assert "| candidate_copy | 1 |" in card and "| premise_no_valid_candidate | 1 |" in card

    with pytest.raises(ValueError, match="needs --candidates"):
        rank(RankConfig(strategy="sampled"), tmp_path / "x", triples=tmp_path / "triples")
    with pytest.raises(Exception, match="holds a 'triples' table, expected 'candidates'"):
        rank(RankConfig(strategy="sampled"), tmp_path / "x", triples=tmp_path / "triples",
             candidates=tmp_path / "triples", scorer=TableScorer(SCORES))
    CANDIDATES.drop("finish_reason").write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(Exception, match=r"bad\.parquet: missing column 'finish_reason'"):
        rank(RankConfig(strategy="sampled"), tmp_path / "x", triples=tmp_path / "triples",
             candidates=tmp_path / "bad.parquet", scorer=TableScorer(SCORES))
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="strategy must be one of gold, sampled, hybrid, got 'best'"):
        RankConfig(strategy="best")
    with pytest.raises(ValueError, match="scorer must be one of embedding, policy, nli, got 'bleu'"):
        RankConfig(scorer="bleu")


def test_embedding_scorer_with_minilm():
    from sempa_train.stages.embedding import load_encoder

    scorer = EmbeddingScorer(load_encoder("all-minilm-l6-v2", show_progress=False))
    scores = scorer.score([P1, P1], ["A man plays a guitar on a stage.", "Stocks fell sharply on Monday."])
    assert scores[0] > 0.8 and scores[1] < 0.3


def test_entailment_index():
    assert entailment_index({0: "CONTRADICTION", 1: "ENTAILMENT", 2: "NEUTRAL"}) == 1
    assert entailment_index({0: "entailment", 1: "not_entailment"}) == 0
    with pytest.raises(ValueError, match="no entailment label"):
        entailment_index({0: "POSITIVE", 1: "NEGATIVE"})


def test_rank_refuses_candidates_of_another_template(tmp_path):
    import polars as pl
    import pytest

    from sempa_train.stages.ranking import check_template

    candidates = pl.DataFrame({"template_id": ["P2", "P2"]})
    check_template(candidates, tmp_path, "P2")
    with pytest.raises(ValueError, match="sampled with template P2 but rank.template is P1"):
        check_template(candidates, tmp_path / "cand", "P1")
