"""NLI sources → validated (premise, hypothesis, label) pairs → (premise, entailment, contradiction) triples.

Readers: JSONL / CSV / Parquet files with ``premise, hypothesis, label`` (the ``stanfordnlp/snli``
schema: 0 entailment, 1 neutral, 2 contradiction, -1 no gold label; the strings ``entailment``,
``neutral``, ``contradiction`` and ``-`` are accepted too), SimCSE's triplet CSV
(``sent0, sent1, hard_neg``), and Hugging Face dataset ids through ``datasets``.

Rows that cannot be used are skipped and counted by reason; a file that cannot be parsed, or that
lacks a required column, is an error naming the file (and line).
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from sempa_train.core.io import text_id
from sempa_train.core.schemas import TRIPLES_SCHEMA

ENTAILMENT, NEUTRAL, CONTRADICTION, NO_GOLD = 0, 1, 2, -1
_STRING_LABELS = {"entailment": ENTAILMENT, "neutral": NEUTRAL, "contradiction": CONTRADICTION, "-": NO_GOLD}
NLI_COLUMNS = ("premise", "hypothesis", "label")
SIMCSE_COLUMNS = ("sent0", "sent1", "hard_neg")
_WHITESPACE = re.compile(r"\s+")


class SourceError(ValueError):
    """An NLI source that cannot be read: unparsable file, missing column, unknown format."""


@dataclass
class NLIPairs:
    """Valid labelled pairs of one source, with the rows that were skipped, by reason."""

    source: str
    rows: int = 0  # rows read from the source (a SimCSE row counts once)
    premises: list[str] = field(default_factory=list)
    hypotheses: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    row_ids: list[int] = field(default_factory=list)  # 0-based source row of each pair
    drops: Counter[str] = field(default_factory=Counter)

    def add(self, row: int, premise: Any, hypothesis: Any, label: Any) -> None:
        """Validate one pair and keep it, or count why it was skipped."""
        if premise is None or hypothesis is None or label is None:
            self.drops["missing_field"] += 1
            return
        premise, hypothesis = clean_text(str(premise)), clean_text(str(hypothesis))
        if not premise or not hypothesis:
            self.drops["empty_text"] += 1
            return
        code = parse_label(label)
        if code is None:
            self.drops["unknown_label"] += 1
            return
        if code == NO_GOLD:
            self.drops["no_gold_label"] += 1
            return
        self.premises.append(premise)
        self.hypotheses.append(hypothesis)
        self.labels.append(code)
        self.row_ids.append(row)


def clean_text(text: str) -> str:
    """Collapse runs of whitespace and strip the ends."""
    return _WHITESPACE.sub(" ", text).strip()


def parse_label(label: Any) -> int | None:
    """0/1/2/-1 from an int, a numeric string, or a label name; None when unknown."""
    if isinstance(label, bool):
        return None
    if isinstance(label, int | float) and float(label).is_integer() and int(label) in (0, 1, 2, -1):
        return int(label)
    if isinstance(label, str):
        text = label.strip().lower()
        if text in _STRING_LABELS:
            return _STRING_LABELS[text]
        if text.lstrip("-").isdigit() and int(text) in (0, 1, 2, -1):
            return int(text)
    return None


def detect_format(source: str) -> str:
    """Guess the format of ``source`` from its extension and, for CSV, its header."""
    path = Path(source)
    suffix = "".join(path.suffixes[-1:]).lower()
    if path.is_file():
        if suffix in (".jsonl", ".json"):
            return "jsonl"
        if suffix == ".parquet":
            return "parquet"
        if suffix in (".csv", ".tsv"):
            try:
                with path.open(encoding="utf-8", newline="") as f:
                    header = next(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","), [])
            except UnicodeDecodeError:
                raise SourceError(f"{source}:1: not UTF-8 text; convert the file to UTF-8") from None
            return "simcse" if set(SIMCSE_COLUMNS) <= set(header) else "csv"
        raise SourceError(f"{source}: cannot tell the format from the extension {suffix!r}; pass --source-format")
    if path.exists():
        raise SourceError(f"{source}: is not a file")
    if suffix in (".jsonl", ".json", ".csv", ".tsv", ".parquet") or source.startswith((".", "/", "~")):
        raise SourceError(f"{source}: no such file")
    return "hf"


def read_nli(source: str, source_format: str = "auto", split: str = "train") -> NLIPairs:
    """Read and validate the NLI pairs of ``source``."""
    fmt = detect_format(source) if source_format == "auto" else source_format
    pairs = NLIPairs(source=source)
    if fmt == "simcse":
        for row, record in enumerate(_csv_records(Path(source), SIMCSE_COLUMNS)):
            pairs.rows += 1
            pairs.add(row, record.get("sent0"), record.get("sent1"), ENTAILMENT)
            pairs.add(row, record.get("sent0"), record.get("hard_neg"), CONTRADICTION)
        return pairs
    readers = {
        "jsonl": lambda: _jsonl_records(Path(source)),
        "csv": lambda: _csv_records(Path(source), NLI_COLUMNS),
        "parquet": lambda: _parquet_records(Path(source)),
        "hf": lambda: _hf_records(source, split),
    }
    if fmt not in readers:
        raise SourceError(f"unknown source format {fmt!r}; known: {', '.join([*readers, 'simcse'])}")
    for row, record in enumerate(readers[fmt]()):
        pairs.rows += 1
        pairs.add(row, record.get("premise"), record.get("hypothesis"), record.get("label"))
    return pairs


def _decoded(path: Path, lineno: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                          "convert the file to UTF-8") from None


def _jsonl_records(path: Path) -> Iterator[Mapping[str, Any]]:
    seen_columns: set[str] = set()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decoded(path, lineno, raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise SourceError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            seen_columns.update(record)
            yield record
    _require_columns(path, seen_columns, NLI_COLUMNS)


def _csv_records(path: Path, required: Iterable[str]) -> Iterator[Mapping[str, Any]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            fieldnames = reader.fieldnames
        except UnicodeDecodeError:
            raise SourceError(f"{path}:1: not UTF-8 text; convert the file to UTF-8") from None
        _require_columns(path, set(fieldnames or ()), required)
        try:
            for record in reader:
                yield {k: (v if v != "" else None) if k == "label" else v for k, v in record.items()}
        except csv.Error as e:
            raise SourceError(f"{path}:{reader.line_num}: cannot parse CSV ({e})") from e
        except UnicodeDecodeError:
            raise SourceError(f"{path}:{reader.line_num + 1}: not UTF-8 text; convert the file to UTF-8") from None


def _parquet_records(path: Path) -> Iterator[Mapping[str, Any]]:
    try:
        df = pl.read_parquet(path)
    except Exception as e:
        raise SourceError(f"{path}: cannot be read as Parquet ({e})") from e
    _require_columns(path, set(df.columns), NLI_COLUMNS)
    yield from df.select(NLI_COLUMNS).iter_rows(named=True)


def _hf_records(dataset_id: str, split: str) -> Iterator[Mapping[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:
        raise SourceError(
            f"cannot load Hugging Face dataset {dataset_id!r} split {split!r} ({e.__class__.__name__}: {e}). "
            "Offline? Pass a local .jsonl/.csv/.parquet file instead."
        ) from e
    _require_columns(Path(dataset_id), set(ds.column_names), NLI_COLUMNS)
    yield from ds


def _require_columns(path: Path, present: set[str], required: Iterable[str]) -> None:
    missing = [c for c in required if c not in present]
    if missing:
        raise SourceError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(sorted(present)) or 'none'}"
        )


@dataclass
class Triples:
    """Grouped triples of one source, as a ``TRIPLES_SCHEMA`` table, with counts and drop reasons."""

    table: pl.DataFrame
    counts: dict[str, int]
    drops: dict[str, int]


def group_triples(pairs: NLIPairs, *, pairing: str = "one", seed: int = 0, max_premises: int | None = None,
                  max_premise_words: int | None = None) -> Triples:
    """Group pairs by premise into (premise, entailment, contradiction) triples.

    ``one`` keeps one triple per premise, picking its entailment and contradiction with an RNG seeded
    by ``seed`` and the premise (so a premise's pick does not depend on the rest of the file);
    ``all`` keeps every combination. Only premises with both an entailment and a contradiction
    yield triples; they keep their first-appearance order, and ``max_premises`` keeps a seeded
    random subset of them. Duplicate pairs count once; a hypothesis given both labels
    for the same premise is dropped as conflicting; a premise of more than ``max_premise_words`` words is
    dropped (``premise_too_long``, one count per pair).
    """
    drops = Counter(pairs.drops)
    by_premise: dict[str, dict[str, dict[int, int]]] = {}  # premise → hypothesis → label → first row
    for premise, hypothesis, label, row in zip(pairs.premises, pairs.hypotheses, pairs.labels, pairs.row_ids,
                                               strict=True):
        if max_premise_words is not None and len(premise.split()) > max_premise_words:
            drops["premise_too_long"] += 1
            continue
        labels = by_premise.setdefault(premise, {}).setdefault(hypothesis, {})
        if label in labels:
            drops["duplicate_pair"] += 1
        else:
            labels[label] = row

    eligible: list[tuple[str, list[tuple[str, int]], list[tuple[str, int]]]] = []
    for premise, hypotheses in by_premise.items():
        entailments: list[tuple[str, int]] = []
        contradictions: list[tuple[str, int]] = []
        for hypothesis, labels in hypotheses.items():
            if len(labels) > 1:
                drops["conflicting_label"] += len(labels)
                continue
            ((label, row),) = labels.items()
            if label == ENTAILMENT:
                entailments.append((hypothesis, row))
            elif label == CONTRADICTION:
                contradictions.append((hypothesis, row))
            else:
                drops["neutral_unused"] += 1
        if not entailments:
            drops["premise_without_entailment"] += 1
        elif not contradictions:
            drops["premise_without_contradiction"] += 1
        else:
            eligible.append((premise, entailments, contradictions))

    if max_premises is not None and max_premises < len(eligible):
        keep = set(random.Random(seed).sample(range(len(eligible)), max_premises))
        drops["over_max_premises"] += len(eligible) - max_premises
        eligible = [item for i, item in enumerate(eligible) if i in keep]

    rows: list[dict[str, Any]] = []
    for premise, entailments, contradictions in eligible:
        pid = text_id(premise)
        if pairing == "one":
            rng = random.Random(f"{seed}:{pid}")
            combos = [(rng.choice(entailments), rng.choice(contradictions))]
        else:
            combos = [(e, c) for e in entailments for c in contradictions]
        for (ent, ent_row), (con, con_row) in combos:
            rows.append({"premise_id": pid, "premise": premise, "entailment": ent, "contradiction": con,
                         "source": pairs.source, "entailment_row": ent_row, "contradiction_row": con_row})

    table = pl.DataFrame(rows, schema=TRIPLES_SCHEMA)
    counts = {
        "source_rows": pairs.rows,
        "valid_pairs": len(pairs.labels),
        "premises": len(by_premise),
        "premises_with_both": len(eligible) + drops.get("over_max_premises", 0),
        "premises_kept": len(eligible),
        "triples": table.height,
    }
    return Triples(table=table, counts=counts, drops=dict(sorted(drops.items())))
