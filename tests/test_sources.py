import json

import polars as pl
import pytest
from conftest import SAMPLE_NLI, write_jsonl

from sempa_train.stages.sources import SourceError, detect_format, group_triples, parse_label, read_nli


def pair(p: str, h: str, label: object) -> dict:
    return {"premise": p, "hypothesis": h, "label": label}


ROWS = [
    pair("P one.", "E one.", 0),
    pair("P one.", "N one.", 1),
    pair("P one.", "C one.", 2),
    pair("P two.", "E two.", 0),  # no contradiction
    pair("P three.", "C three.", 2),  # no entailment
    pair("P one.", "E one b.", "entailment"),
    pair("P four.", "E four.", -1),  # no gold label
    pair("P four.", "", 0),  # empty text
    {"premise": "P five.", "label": 0},  # missing hypothesis
    pair("P five.", "X.", 7),  # unknown label
    pair("P one.", "E one.", 0),  # duplicate
]


def test_jsonl_drops_are_counted_by_reason(tmp_path):
    pairs = read_nli(str(write_jsonl(tmp_path / "nli.jsonl", ROWS)))
    assert pairs.rows == len(ROWS)
    assert dict(pairs.drops) == {"no_gold_label": 1, "empty_text": 1, "missing_field": 1, "unknown_label": 1}
    triples = group_triples(pairs, pairing="all")
    assert triples.drops == {
        "duplicate_pair": 1, "empty_text": 1, "missing_field": 1, "neutral_unused": 1, "no_gold_label": 1,
        "premise_without_contradiction": 1, "premise_without_entailment": 1, "unknown_label": 1,
    }
    t = triples.table
    assert t["premise"].to_list() == ["P one.", "P one."]
    assert sorted(t["entailment"].to_list()) == ["E one b.", "E one."]
    assert set(t["contradiction"].to_list()) == {"C one."}
    assert sorted(t["entailment_row"].to_list()) == [0, 5]
    assert t["contradiction_row"].to_list() == [2, 2]
    assert triples.counts["premises_with_both"] == 1


def test_pairing_one_is_deterministic_and_one_per_premise(tmp_path):
    pairs = read_nli(str(write_jsonl(tmp_path / "nli.jsonl", ROWS)))
    a = group_triples(pairs, pairing="one", seed=3).table
    b = group_triples(pairs, pairing="one", seed=3).table
    assert a.equals(b)
    assert a.height == 1
    picks = {group_triples(pairs, pairing="one", seed=s).table["entailment"][0] for s in range(20)}
    assert picks == {"E one.", "E one b."}  # the seed really chooses


def test_max_premises_keeps_a_seeded_subset():
    pairs = read_nli(str(SAMPLE_NLI))
    full = group_triples(pairs)
    sub = group_triples(pairs, max_premises=10, seed=1)
    assert sub.table.height == 10
    assert set(sub.table["premise_id"]) <= set(full.table["premise_id"])
    assert sub.drops["over_max_premises"] == full.table.height - 10
    assert sub.table.equals(group_triples(pairs, max_premises=10, seed=1).table)


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(pair("a", "b", 0)) + "\n{not json\n")
    with pytest.raises(SourceError, match=r"bad\.jsonl:2: not valid JSON"):
        read_nli(str(path))


def test_missing_column_names_file_and_column(tmp_path):
    path = write_jsonl(tmp_path / "nolabel.jsonl", [{"premise": "a", "hypothesis": "b"}])
    with pytest.raises(SourceError, match=r"nolabel\.jsonl: missing column\(s\) label"):
        read_nli(str(path))
    csv = tmp_path / "x.csv"
    csv.write_text("premise,hyp,label\na,b,0\n")
    with pytest.raises(SourceError, match=r"x\.csv: missing column\(s\) hypothesis"):
        read_nli(str(csv))


def test_csv_parquet_and_simcse_sources(tmp_path):
    csv = tmp_path / "nli.csv"
    csv.write_text('premise,hypothesis,label\n"A, b.",E.,0\n"A, b.",C.,contradiction\nA2,N,neutral\n')
    t = group_triples(read_nli(str(csv))).table
    assert t.select("premise", "entailment", "contradiction").row(0) == ("A, b.", "E.", "C.")

    parquet = tmp_path / "nli.parquet"
    pl.DataFrame(ROWS[:3]).write_parquet(parquet)
    assert group_triples(read_nli(str(parquet))).table.height == 1

    simcse = tmp_path / "nli_for_simcse.csv"
    simcse.write_text("sent0,sent1,hard_neg\nP.,E.,C.\nP.,E2.,C2.\nQ.,,C3.\n")
    assert detect_format(str(simcse)) == "simcse"
    pairs = read_nli(str(simcse))
    assert pairs.rows == 3 and pairs.drops["empty_text"] == 1
    assert group_triples(pairs, pairing="all").table.height == 4  # 2 entailments x 2 contradictions


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        read_nli(str(tmp_path / "nope.jsonl"))
    odd = tmp_path / "data.txt"
    odd.write_text("x")
    with pytest.raises(SourceError, match="--source-format"):
        read_nli(str(odd))


@pytest.mark.parametrize(
    ("raw", "code"),
    [(0, 0), (2, 2), ("1", 1), ("-1", -1), ("-", -1), ("Contradiction", 2), (2.0, 2), (True, None), ("x", None),
     (5, None)],
)
def test_parse_label(raw, code):
    assert parse_label(raw) == code


def test_an_over_long_premise_is_dropped_and_counted(tmp_path):
    long = "word " * 50_000
    rows = [{"premise": long, "hypothesis": "E.", "label": 0}, {"premise": long, "hypothesis": "C.", "label": 2},
            {"premise": "A dog runs.", "hypothesis": "An animal moves.", "label": 0},
            {"premise": "A dog runs.", "hypothesis": "A cat sleeps.", "label": 2}]
    triples = group_triples(read_nli(str(write_jsonl(tmp_path / "nli.jsonl", rows))), max_premise_words=200)
    assert triples.table["premise"].to_list() == ["A dog runs."]
    assert triples.drops["premise_too_long"] == 2


def test_a_non_utf8_byte_is_named_with_file_and_line(tmp_path):
    path = tmp_path / "nli.jsonl"
    path.write_bytes(b'{"premise": "A.", "hypothesis": "B.", "label": 0}\n{"premise": "caf\xe9", "hypothesis": "C.", '
                     b'"label": 2}\n')
    with pytest.raises(SourceError, match=r"nli\.jsonl:2: not UTF-8 text \(byte 0xe9"):
        read_nli(str(path))
    csv_path = tmp_path / "nli.csv"
    csv_path.write_bytes(b"premise,hypothesis,label\nA.,B.,0\ncaf\xe9,C.,2\n")
    with pytest.raises(SourceError, match=r"nli\.csv:\d+: not UTF-8 text"):
        read_nli(str(csv_path))
