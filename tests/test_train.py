import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sempa_train.core.config import EmbedConfig, TrainConfig
from sempa_train.core.io import read_manifest
from sempa_train.stages.embedding import load_encoder
from sempa_train.stages.train import to_trl_records, train_dpo

SENTENCES = ["A dog runs in the park.", "Two women are drinking coffee.", "A chef slices vegetables."]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, sample_prefs, tmp_path_factory):
    cfg = TrainConfig(model=str(tiny_model_dir), max_steps=3, batch_size=4, learning_rate=1e-2, logging_steps=1,
                      save_merged=True)
    out = tmp_path_factory.mktemp("train") / "model"
    return train_dpo(cfg, sample_prefs, out)


def test_dpo_changes_the_adapter_and_the_embeddings(trained, tiny_model_dir):
    weights = load_file(trained.adapter_dir / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b, "no LoRA weights saved"
    assert any(torch.count_nonzero(w) > 0 for w in lora_b)  # LoRA B starts at zero: training moved it
    assert any(name.endswith("mlp.down_proj.lora_B.weight") for name in weights)  # all linear layers

    embed = EmbedConfig(dtype="float32")
    base = load_encoder(tiny_model_dir, embed, show_progress=False).encode(SENTENCES)
    tuned = load_encoder(tiny_model_dir, embed, adapter=trained.adapter_dir, show_progress=False).encode(SENTENCES)
    merged = load_encoder(trained.out_dir / "merged", embed, show_progress=False).encode(SENTENCES)
    assert not np.allclose(base, tuned, atol=1e-4)
    np.testing.assert_allclose(tuned, merged, rtol=1e-3, atol=1e-3)


def test_outputs_record_metrics_config_and_data_version(trained, sample_prefs):
    log = [json.loads(line) for line in (trained.out_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [h for h in log if "loss" in h]
    assert len(steps) == 3 and all("rewards/margins" in h and "rewards/accuracies" in h for h in steps)
    manifest = json.loads((trained.out_dir / "manifest.json").read_text())
    assert manifest["data_sha256"] == read_manifest(sample_prefs)["data_sha256"]
    assert manifest["config"]["learning_rate"] == 1e-2 and manifest["chat_template"] is True
    assert trained.metrics["global_steps"] == 3
    assert not (trained.out_dir / "trainer").exists()


def test_existing_output_is_not_replaced(trained, sample_prefs, tiny_model_dir):
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_dpo(TrainConfig(model=str(tiny_model_dir)), sample_prefs, trained.out_dir)


def test_trl_records_chat_and_plain():
    import polars as pl

    df = pl.DataFrame({"prompt": ["Say it."], "chosen": ["Yes."], "rejected": ["No."]})
    chat = to_trl_records(df, chat=True)[0]
    assert chat["prompt"] == [{"role": "user", "content": "Say it."}]
    assert chat["chosen"] == [{"role": "assistant", "content": "Yes."}]
    assert to_trl_records(df, chat=False)[0] == {"prompt": "Say it.\n", "chosen": "Yes.", "rejected": "No."}


def test_effective_batch_is_kept_across_process_counts():
    from sempa_train.stages.train import accumulation_steps

    cfg = TrainConfig.preset("paper")
    assert [accumulation_steps(cfg, n) for n in (1, 2, 4, 8)] == [32, 16, 8, 4]
    with pytest.raises(ValueError, match="not a multiple of batch_size 8 x 3 processes"):
        accumulation_steps(cfg, 3)
    assert accumulation_steps(TrainConfig(gradient_accumulation_steps=5), 4) == 5  # no effective batch: as given


def test_two_process_training(tiny_model_dir, sample_prefs, tmp_path):
    """The multi-process path of `accelerate launch` on GPUs, here with two CPU processes (torchrun, gloo)."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "sempa_train.cli", "train", "--data", str(sample_prefs), "--out", str(out), "--model", str(tiny_model_dir),
         "--max-steps", "2", "--batch-size", "2", "--effective-batch-size", "8"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},  # torchrun's own
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["effective_batch_size"] == 8  # 2 per step x 2 accumulated x 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob(".ddp.partial*"))


def test_reference_batch_size_reaches_trl(tmp_path):
    from sempa_train.stages.train import build_dpo_config

    cpu = torch.device("cpu")
    assert build_dpo_config(TrainConfig(bf16=False), tmp_path, cpu).precompute_ref_batch_size is None  # = batch
    assert build_dpo_config(TrainConfig(bf16=False, ref_batch_size=32), tmp_path, cpu).precompute_ref_batch_size == 32
