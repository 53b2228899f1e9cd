"""Results of the untuned model are cached by content: the same inputs hit, any change misses."""

import json
import shutil

import pytest
from test_sts import make_senteval

import sempa_train.stages.evaluation as evaluation
import sempa_train.stages.quantize as quantize
from sempa_train.core.config import EmbedConfig, EvalConfig, RetentionConfig
from sempa_train.stages import int8_kernels
from sempa_train.stages.evaluation import run_sts_eval, sts_cache_key
from sempa_train.stages.sts_data import load_tasks

EMBED = EmbedConfig(dtype="float32")


@pytest.fixture
def senteval(tmp_path):
    return make_senteval(tmp_path / "senteval")


def _cfg(senteval, **changes):
    return EvalConfig(tasks=("STSBenchmark",), split="dev", senteval_dir=str(senteval)).replace(**changes)


def test_sts_cache_key_changes_with_each_input(tiny_model_dir, senteval, tmp_path, monkeypatch):
    cfg = _cfg(senteval)
    tasks = load_tasks(cfg.tasks, cfg.split, cfg.senteval_dir)
    key = sts_cache_key(tiny_model_dir, cfg, EMBED, tasks)
    copy = tmp_path / "same-model-elsewhere"
    shutil.copytree(tiny_model_dir, copy)
    assert sts_cache_key(copy, cfg, EMBED, tasks) == key  # weights, not paths, name the model

    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other_model)
    from safetensors.torch import load_file, save_file

    weights = load_file(other_model / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1e-3
    save_file(weights, other_model / "model.safetensors", metadata={"format": "pt"})
    assert sts_cache_key(other_model, cfg, EMBED, tasks) != key

    two_tasks = cfg.replace(tasks=("STSBenchmark", "SICKRelatedness"))
    assert sts_cache_key(tiny_model_dir, two_tasks, EMBED, load_tasks(two_tasks.tasks, "dev", senteval)) != key
    assert sts_cache_key(tiny_model_dir, cfg, EMBED.replace(layer=-2), tasks) != key
    assert sts_cache_key(tiny_model_dir, cfg, EMBED.replace(batch_size=8), tasks) != key
    int8 = EMBED.replace(quantize="int8")
    monkeypatch.setattr(int8_kernels, "chosen", lambda: "onednn")
    int8_key = sts_cache_key(tiny_model_dir, cfg, int8, tasks)
    assert int8_key != key
    monkeypatch.setattr(int8_kernels, "chosen", lambda: "fbgemm")  # another int8 kernel: other rounding
    assert sts_cache_key(tiny_model_dir, cfg, int8, tasks) != int8_key
    monkeypatch.setattr(int8_kernels, "chosen", lambda: "onednn")
    assert sts_cache_key(tiny_model_dir, cfg, int8, tasks) == int8_key
    levels = int8_kernels.weight_levels("onednn")
    monkeypatch.setattr(int8_kernels, "weight_levels", lambda name: 190 - levels)  # 7-bit weights for 8 or back
    assert sts_cache_key(tiny_model_dir, cfg, int8, tasks) != int8_key
    monkeypatch.setattr(int8_kernels, "weight_levels", lambda name: levels)
    monkeypatch.setattr(quantize, "INT8_VERSION", quantize.INT8_VERSION + 1)  # the int8 scheme changed
    assert sts_cache_key(tiny_model_dir, cfg, int8, tasks) != int8_key
    assert sts_cache_key(tiny_model_dir, cfg, EMBED, tasks) == key  # results without int8 stay valid
    csv = senteval / "STS" / "STSBenchmark" / "sts-dev.csv"
    csv.write_text(csv.read_text().replace("5.000", "4.000"))
    assert sts_cache_key(tiny_model_dir, cfg, EMBED, load_tasks(cfg.tasks, cfg.split, senteval)) != key


def test_base_sts_is_encoded_once(tiny_model_dir, senteval, tmp_path, monkeypatch):
    cfg = _cfg(senteval)
    first = run_sts_eval(str(tiny_model_dir), cfg, EMBED, out=tmp_path / "a" / "base.json")

    def no_encoding(*args, **kwargs):
        raise AssertionError("the untuned model was encoded again")

    monkeypatch.setattr(evaluation, "load_encoder", no_encoding)
    second = run_sts_eval(str(tiny_model_dir), cfg, EMBED, out=tmp_path / "b" / "base.json")
    assert second["tasks"] == first["tasks"] and second["avg"] == first["avg"]
    assert (tmp_path / "b" / "base.predictions.parquet").read_bytes() == \
        (tmp_path / "a" / "base.predictions.parquet").read_bytes()
    with pytest.raises(AssertionError, match="encoded again"):  # an adapter is never served from the cache
        run_sts_eval(str(tiny_model_dir), cfg, EMBED, adapter=tmp_path / "adapter")
    with pytest.raises(AssertionError, match="encoded again"):  # nor a run that turns the cache off
        run_sts_eval(str(tiny_model_dir), cfg.replace(cache_base=False), EMBED)


def test_results_json_is_the_commit_point_of_an_evaluation(tiny_model_dir, senteval, tmp_path):
    """JSON and predictions are two files: the JSON, written last, names the predictions' hash, so predictions left
    by an interrupted later evaluation are refused instead of being paired with the old numbers."""
    import polars as pl

    from sempa_train.core.io import IntegrityError, file_sha256, write_parquet
    from sempa_train.core.schemas import PREDICTIONS_SCHEMA
    from sempa_train.stages.evaluation import delta_intervals, predictions_path, read_predictions

    out = tmp_path / "base.json"
    run_sts_eval(str(tiny_model_dir), _cfg(senteval).replace(cache_base=False), EMBED, out=out)
    recorded = json.loads(out.read_text())["predictions_sha256"]
    assert recorded == file_sha256(predictions_path(out))
    assert read_predictions(out).height > 0
    crashed = read_predictions(out).with_columns(cosine=pl.col("cosine") * 0.5)  # the next run died after this write
    write_parquet(crashed, predictions_path(out), PREDICTIONS_SCHEMA)
    with pytest.raises(IntegrityError, match=r"base\.predictions\.parquet does not belong to base\.json"):
        delta_intervals(out, out)


def test_base_retention_is_probed_once(tiny_model_dir, tmp_path, monkeypatch):
    import sempa_train.stages.retention as retention
    from sempa_train.stages.embedding import load_encoder

    text = tmp_path / "heldout.txt"
    text.write_text("A dog runs in the park.\nTwo women are drinking coffee.\n")
    cfg = RetentionConfig(text_file=str(text), max_texts=2, paraphrases=1)
    encoder = load_encoder("all-minilm-l6-v2", show_progress=False)
    first = retention.run_retention(str(tiny_model_dir), None, cfg, encoder, cache=True)
    monkeypatch.setattr(retention, "_run_probes", lambda *a, **k: pytest.fail("probed again"))
    assert retention.run_retention(str(tiny_model_dir), None, cfg, encoder, cache=True) == first
    text.write_text("A different held-out text.\n")
    with pytest.raises(pytest.fail.Exception, match="probed again"):
        retention.run_retention(str(tiny_model_dir), None, cfg, encoder, cache=True)
