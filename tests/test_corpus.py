"""Using a tuned model: sempa embed (resumable, dedup, normalisation), search, export, model cards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import SAMPLE_NLI, kill_after_shards, write_jsonl

from sempa_train.core.config import CorpusConfig, EmbedConfig
from sempa_train.core.shards import work_dir_for
from sempa_train.stages.corpus import embed_corpus, read_corpus, read_embeddings, search
from sempa_train.stages.embedding import load_encoder
from sempa_train.stages.generation import vllm_available

REQUIRE_VLLM = os.environ.get("SEMPA_REQUIRE_VLLM") == "1"  # set by .ci/run: no silent skip in CI
FP32 = EmbedConfig(dtype="float32", batch_size=8)


def corpus_lines() -> list[str]:
    rows = [json.loads(line) for line in SAMPLE_NLI.read_text().splitlines()]
    return list(dict.fromkeys([r["premise"] for r in rows] + [r["hypothesis"] for r in rows]))


@pytest.fixture(scope="module")
def corpus_txt(tmp_path_factory) -> Path:
    """Distinct sentences of the NLI sample, then repeats of the first five, with blank lines between."""
    lines = corpus_lines()
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines + ["", "   "] + lines[:5]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny model with random (non-zero) B matrices, so it changes the embeddings."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(out)
    return out


def test_embed_matches_the_encoder_and_dedups(tiny_model_dir, corpus_txt, tmp_path):
    distinct = corpus_lines()
    result = embed_corpus(corpus_txt, tmp_path / "emb", model=str(tiny_model_dir), embed=FP32,
                          corpus=CorpusConfig(shard_size=40), show_progress=False)
    assert result.counts == {"rows": len(distinct) + 7, "empty": 2, "texts": len(distinct) + 5,
                             "distinct": len(distinct), "duplicates": 5, "shards": -(-len(distinct) // 40),
                             "dim": 128}
    table = pl.read_parquet(tmp_path / "emb" / "data.parquet")  # what a user opens
    assert table.columns == ["id", "text", "vector"] and table.schema["vector"] == pl.Array(pl.Float32, 128)
    assert table["text"].to_list() == distinct and table["id"].n_unique() == len(distinct)
    expected = load_encoder(str(tiny_model_dir), FP32).encode(distinct)
    np.testing.assert_allclose(table["vector"].to_numpy(), expected, atol=1e-5)
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["kind"] == "embeddings" and manifest["config"]["model"] == str(tiny_model_dir)
    assert manifest["config"]["embed"]["dtype"] == "float32" and manifest["drops"] == {"empty": 2, "duplicate": 5}
    assert manifest["code_version"] and manifest["parents"]["source_sha256"]
    assert "duplicate" in (tmp_path / "emb" / "README.md").read_text()

    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "emb" / "data.parquet"), split="train")
    assert len(loaded) == len(distinct) and len(loaded[0]["vector"]) == 128


def test_normalize_gives_unit_vectors_in_the_same_directions(tiny_model_dir, corpus_txt, tmp_path):
    raw, _ = read_embeddings(embed_corpus(corpus_txt, tmp_path / "raw", model=str(tiny_model_dir), embed=FP32,
                                          show_progress=False).out_dir)
    unit, manifest = read_embeddings(embed_corpus(corpus_txt, tmp_path / "unit", model=str(tiny_model_dir),
                                                  embed=FP32, corpus=CorpusConfig(normalize=True),
                                                  show_progress=False).out_dir)
    vectors, units = raw["vector"].to_numpy(), unit["vector"].to_numpy()
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    np.testing.assert_allclose(np.linalg.norm(units, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(units, vectors / np.linalg.norm(vectors, axis=1, keepdims=True), atol=1e-5)
    assert manifest["config"]["normalize"] is True


def test_columns_of_table_sources(tmp_path):
    rows = [{"sentence": "A dog runs.", "label": 1}, {"sentence": "A cat sleeps.", "label": 0}]
    jsonl = write_jsonl(tmp_path / "c.jsonl", rows)
    assert read_corpus(jsonl)[0] == ["A dog runs.", "A cat sleeps."]  # the only string column
    with pytest.raises(ValueError, match=r"no column 'text'; columns found: sentence, label"):
        read_corpus(jsonl, "text")
    pl.DataFrame({"text": ["x", None, "y"], "other": ["a", "b", "c"]}).write_csv(tmp_path / "c.csv")
    assert read_corpus(tmp_path / "c.csv") == (["x", "y"], {"rows": 3, "empty": 1})
    pl.DataFrame({"a": ["x"], "b": ["y"]}).write_parquet(tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=r"pass --column \(columns found: a, b\)"):
        read_corpus(tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=r"column 'label' holds Int64, not text"):
        read_corpus(jsonl, "label")
    (tmp_path / "c.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="unsupported corpus format '.xml'"):
        read_corpus(tmp_path / "c.xml")


def test_cli_names_a_wrong_column_in_one_line(tiny_model_dir, tmp_path):
    from sempa_train.cli import main

    jsonl = write_jsonl(tmp_path / "c.jsonl", [{"sentence": "A dog runs.", "label": "x"}])
    assert main(["embed", str(jsonl), "--model", str(tiny_model_dir), "--out", str(tmp_path / "e"),
                 "--column", "text"]) == 2
    assert not (tmp_path / "e").exists()


def test_kill_9_midway_then_resume_gives_the_same_table(tiny_model_dir, corpus_txt, tmp_path):
    """A real ``sempa embed`` process killed with SIGKILL keeps its finished shards; the rerun's table is the
    uninterrupted run's."""
    out = tmp_path / "emb"
    args = [sys.executable, "-m", "sempa_train.cli", "embed", str(corpus_txt), "--out", str(out),
            "--model", str(tiny_model_dir), "--dtype", "float32", "--batch-size", "1", "--shard-size", "4"]
    work = work_dir_for(out)
    finished = kill_after_shards(args, work)
    shards = -(-len(corpus_lines()) // 4)
    assert 0 < finished < shards, "the run should have been killed halfway"

    rerun = subprocess.run([*args, "-v"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming, {finished} of {shards} shards already done" in rerun.stderr
    reference = embed_corpus(corpus_txt, tmp_path / "ref", model=str(tiny_model_dir),
                             embed=EmbedConfig(dtype="float32", batch_size=1), corpus=CorpusConfig(shard_size=4),
                             show_progress=False)
    assert pl.read_parquet(out / "data.parquet").equals(pl.read_parquet(reference.out_dir / "data.parquet"))
    assert not work.exists()


def test_search_finds_a_text_by_itself_with_the_index_adapter(tiny_model_dir, tiny_adapter, corpus_txt, tmp_path):
    index = embed_corpus(corpus_txt, tmp_path / "emb", model=str(tiny_model_dir), adapter=tiny_adapter,
                         embed=FP32, show_progress=False).out_dir
    target = corpus_lines()[7]
    hits = search(index, target, k=3)
    assert hits.columns == ["rank", "score", "id", "text"] and hits.height == 3
    assert hits["text"][0] == target and hits["score"][0] == pytest.approx(1.0, abs=1e-5)
    assert hits["score"].is_sorted(descending=True)
    # the query went through the adapter: the base model ranks by other vectors
    base_vector = load_encoder(str(tiny_model_dir), FP32).encode([target])[0]
    assert not np.allclose(base_vector, read_embeddings(index)[0]["vector"].to_numpy()[7], atol=1e-3)
    (tiny_adapter / "adapter_model.safetensors").rename(tmp_path / "moved.safetensors")
    try:
        with pytest.raises(ValueError, match="missing or has changed; embed the corpus again"):
            search(index, target)
    finally:
        (tmp_path / "moved.safetensors").rename(tiny_adapter / "adapter_model.safetensors")


def test_export_merges_the_adapter_and_keeps_the_embeddings(tiny_model_dir, tiny_adapter, tmp_path):
    from sempa_train.core.models import PROMPTEOL_SETTINGS_KEY, prompteol_settings
    from sempa_train.stages.export import export_merged

    merged = export_merged(str(tiny_model_dir), tiny_adapter, tmp_path / "merged")
    assert prompteol_settings(merged)["pooling"] == "last" and not (merged / "adapter_config.json").exists()
    assert json.loads((merged / "config.json").read_text())[PROMPTEOL_SETTINGS_KEY]["adapter_sha256"]
    sentences = corpus_lines()[:12]
    expected = load_encoder(str(tiny_model_dir), FP32, adapter=tiny_adapter).encode(sentences)
    np.testing.assert_allclose(load_encoder(str(merged), FP32).encode(sentences), expected, atol=1e-4)
    assert "vllm serve" in (merged / "README.md").read_text()
    with pytest.raises(FileExistsError):
        export_merged(str(tiny_model_dir), tiny_adapter, tmp_path / "merged")


def test_embed_stage_of_the_plan_hashes_the_corpus_content(tiny_model_dir, corpus_txt, tmp_path):
    from sempa_train.core.store import Store
    from sempa_train.plan import STAGE_NAMES, RunConfig, execute, plan_stages

    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_txt.read_text())
    cfg = RunConfig.build(overrides={"corpus": {"source": str(corpus)}, "embed": {"dtype": "float32"}},
                          model=str(tiny_model_dir))
    first = execute(cfg, Store(tmp_path / "store"), stages=["embed"])
    assert first.artifacts["embeddings"].is_dir() and read_embeddings(first.artifacts["embeddings"])[0].height > 0
    assert execute(cfg, Store(tmp_path / "store"), stages=["embed"]).reused["embed"]
    corpus.write_text("A new corpus.\n")  # same path, other content: another key
    again = execute(cfg, Store(tmp_path / "store"), stages=["embed"])
    assert not again.reused["embed"] and again.steps["embed"].key != first.steps["embed"].key
    # the stage is part of a plan only when a corpus is set
    assert "embed" not in [s.name for s in plan_stages(RunConfig(), STAGE_NAMES)]
    assert "embed" in [s.name for s in plan_stages(cfg, STAGE_NAMES)]


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available() and not REQUIRE_VLLM, reason="vLLM not installed")
def test_vllm_pooling_backend_matches_the_transformers_encoder(tiny_model_dir, tiny_adapter, tmp_path):
    """vLLM's pooling runner (last token, no normalisation) on the merged folder gives the PromptEOL vectors."""
    from sempa_train.stages.export import export_merged

    merged = export_merged(str(tiny_model_dir), tiny_adapter, tmp_path / "merged")
    sentences = corpus_lines()[:16]
    expected = load_encoder(str(tiny_model_dir), FP32, adapter=tiny_adapter).encode(sentences)
    encoder = load_encoder(str(merged), EmbedConfig(dtype="float32", backend="vllm"))
    try:
        vectors = encoder.encode(sentences)
    finally:
        encoder.close()
    cos = np.einsum("ij,ij->i", vectors, expected) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() >= 0.999
    with pytest.raises(ValueError, match="merge the adapter first"):
        load_encoder(str(tiny_model_dir), EmbedConfig(backend="vllm"), adapter=tiny_adapter)
