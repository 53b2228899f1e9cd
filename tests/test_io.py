import json

import polars as pl
import pytest

from sempa_train.core.io import (
    SchemaError,
    atomic_dir,
    read_dataset,
    read_parquet,
    write_dataset,
    write_parquet,
)
from sempa_train.core.schemas import TRIPLES_SCHEMA


def triples(n: int = 2) -> pl.DataFrame:
    return pl.DataFrame(
        {"premise_id": [f"id{i}" for i in range(n)], "premise": ["p"] * n, "entailment": ["e"] * n,
         "contradiction": ["c"] * n, "source": ["s"] * n, "entailment_row": list(range(n)),
         "contradiction_row": list(range(n))},
        schema=TRIPLES_SCHEMA,
    )


def test_schema_error_names_file_and_columns(tmp_path):
    bad = triples().drop("premise").with_columns(pl.col("entailment_row").cast(pl.Int32), extra=pl.lit(1))
    with pytest.raises(SchemaError) as e:
        write_parquet(bad, tmp_path / "t.parquet", TRIPLES_SCHEMA)
    msg = str(e.value)
    assert "t.parquet" in msg and "missing column 'premise'" in msg
    assert "'entailment_row' has type Int32, expected Int64" in msg and "'extra'" in msg
    assert not list(tmp_path.iterdir())  # nothing written

    bad.write_parquet(tmp_path / "foreign.parquet")
    with pytest.raises(SchemaError, match=r"foreign\.parquet: missing column 'premise'"):
        read_parquet(tmp_path / "foreign.parquet", TRIPLES_SCHEMA)


def test_dataset_folder_round_trip_and_card(tmp_path):
    out = tmp_path / "ds"
    manifest = write_dataset(out, triples(3), kind="triples", config={"seed": 1}, source="x.jsonl",
                             counts={"triples": 3}, drops={"empty_text": 2})
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "data.parquet", "manifest.json"]
    assert manifest["rows"] == 3 and json.loads((out / "config.json").read_text()) == {"seed": 1}
    card = (out / "README.md").read_text()
    assert "| empty_text | 2 |" in card and "rows: 3" in card and "x.jsonl" in card
    assert read_dataset(out, "triples").equals(triples(3))
    with pytest.raises(SchemaError, match="holds a 'triples' table, expected 'preferences'"):
        read_dataset(out, "preferences")


def test_existing_dataset_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "ds"
    write_dataset(out, triples(1), kind="triples", config={}, source="a")
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_dataset(out, triples(2), kind="triples", config={}, source="b")
    assert read_dataset(out, "triples").height == 1
    write_dataset(out, triples(2), kind="triples", config={}, source="b", overwrite=True)
    assert read_dataset(out, "triples").height == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temp or old folders left


def test_failed_write_leaves_old_data_and_no_temp(tmp_path):
    out = tmp_path / "ds"
    write_dataset(out, triples(1), kind="triples", config={}, source="a")
    with pytest.raises(SchemaError):
        write_dataset(out, triples(1).drop("source"), kind="triples", config={}, source="b", overwrite=True)
    assert read_dataset(out, "triples").height == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]

    def crash_midway() -> None:
        with atomic_dir(tmp_path / "new") as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("crash in the middle")

    with pytest.raises(RuntimeError):
        crash_midway()
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_a_tampered_or_half_copied_data_file_is_refused_by_name(tmp_path):
    from sempa_train.core.io import IntegrityError
    from sempa_train.core.store import dataset_hash

    out = tmp_path / "ds"
    recorded = write_dataset(out, triples(3), kind="triples", config={}, source="x")["data_sha256"]
    assert dataset_hash(out) == recorded
    triples(3).with_columns(premise=pl.lit("changed")).write_parquet(out / "data.parquet")  # valid, but not ours
    for read in (lambda: read_dataset(out, "triples"), lambda: dataset_hash(out)):
        with pytest.raises(IntegrityError, match=r"ds/data\.parquet: its content does not match the manifest"):
            read()
    write_dataset(out, triples(3), kind="triples", config={}, source="x", overwrite=True)
    data = (out / "data.parquet").read_bytes()
    (out / "data.parquet").write_bytes(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(IntegrityError, match="copied incompletely"):
        read_dataset(out, "triples")


def test_dataset_folders_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        write_dataset(tmp_path / "ds", triples(1), kind="triples", config={}, source="x")
    finally:
        os.umask(old)
    assert (tmp_path / "ds").stat().st_mode & 0o777 == 0o755


def test_replace_dir_never_leaves_a_moment_without_the_folder(tmp_path):
    """A reader polling the folder while it is replaced 300 times always finds a complete version."""
    import threading

    from sempa_train.core.io import replace_dir

    target = tmp_path / "out"
    target.mkdir()
    (target / "marker").write_text("0")
    misses: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                (target / "marker").read_text()
            except OSError as err:
                misses.append(repr(err))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(1, 301):
            new = tmp_path / f"new-{i}"
            new.mkdir()
            (new / "marker").write_text(str(i))
            replace_dir(new, target)
    finally:
        done.set()
        reader.join()
    assert not misses, misses[:3]
    assert (target / "marker").read_text() == "300"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old versions are gone
