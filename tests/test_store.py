import json
import threading

import polars as pl
import pytest

from sempa_train.core.io import write_dataset
from sempa_train.core.schemas import TRIPLES_SCHEMA
from sempa_train.core.store import Store, content_key, dataset_hash


def triples(tag: str) -> pl.DataFrame:
    return pl.DataFrame([{"premise_id": tag, "premise": tag, "entailment": "e", "contradiction": "c", "source": "s",
                          "entailment_row": 0, "contradiction_row": 1}], schema=TRIPLES_SCHEMA)


def test_content_key_depends_on_content_not_paths():
    a = content_key("rank", {"strategy": "sampled"}, {"triples": "abc"})
    assert a == content_key("rank", {"strategy": "sampled"}, {"triples": "abc"})
    assert a != content_key("rank", {"strategy": "gold"}, {"triples": "abc"})
    assert a != content_key("rank", {"strategy": "sampled"}, {"triples": "abd"})
    assert a != content_key("sample", {"strategy": "sampled"}, {"triples": "abc"})


def test_publish_versions_are_immutable_and_latest_moves(tmp_path):
    store = Store(tmp_path / "store")
    first = write_dataset(tmp_path / "a", triples("a"), kind="triples", config={}, source="x")
    write_dataset(tmp_path / "b", triples("b"), kind="triples", config={}, source="x")
    v1 = store.publish("snli", {"triples": tmp_path / "a"}, {"note": "first"})
    v2 = store.publish("snli", {"triples": tmp_path / "b"}, {"note": "second"})
    assert (v1.name, v2.name) == ("v0001", "v0002")
    assert store.versions("snli") == ["v0001", "v0002"]
    assert store.latest("snli") == v2 and (store.dataset_dir("snli") / "latest").resolve() == v2.resolve()
    manifest = json.loads((v1 / "manifest.json").read_text())
    assert manifest["note"] == "first" and manifest["parts"]["triples"]["data_sha256"] == first["data_sha256"]
    assert dataset_hash(v1 / "triples") == first["data_sha256"]
    again = store.publish("snli", {"triples": tmp_path / "a"}, {"note": "a resumed run"})  # data v0001 holds
    assert again == v1 and store.versions("snli") == ["v0001", "v0002"] and store.latest("snli") == v2
    assert json.loads((v1 / "manifest.json").read_text())["note"] == "first"
    with pytest.raises(ValueError, match="dataset name"):
        store.dataset_dir("../escape")


def test_concurrent_publishes_get_distinct_versions(tmp_path):
    """Six runs publishing different data at once get six complete versions; two with the same data get one."""
    store = Store(tmp_path / "store")
    for i in range(6):
        write_dataset(tmp_path / f"d{i}", triples(f"d{i}"), kind="triples", config={}, source="x")
    results, errors = [], []

    def publish(i: int) -> None:
        try:
            results.append(store.publish("snli", {"triples": tmp_path / f"d{i}"}, {}))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(i % 6,)) for i in range(8)]  # d0 and d1 twice
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 8 and sorted({p.name for p in results}) == [f"v{i:04d}" for i in range(1, 7)]
    assert store.versions("snli") == [f"v{i:04d}" for i in range(1, 7)]
    assert store.latest("snli").name == "v0006"
    published = {json.loads((p / "manifest.json").read_text())["parts"]["triples"]["data_sha256"] for p in results}
    assert len(published) == 6  # each version holds one run's data, complete
    assert not [p for p in store.dataset_dir("snli").iterdir() if p.name.startswith(".publish-")]
