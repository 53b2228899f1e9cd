import pytest

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
