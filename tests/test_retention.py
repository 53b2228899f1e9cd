import json
import math

import pytest
import torch

from sempa_train.core.config import GateConfig
from sempa_train.core.models import load_causal_lm
from sempa_train.stages.assessment import gate_failures
from sempa_train.stages.generation import TransformersBackend
from sempa_train.stages.retention import compare, held_out_texts, lm_eval_probe, paraphrase_probe, perplexity


def test_held_out_texts_from_txt_and_jsonl(tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("One  text.\n\nTwo.\nOne text.\nThree.\n")
    assert held_out_texts(txt, 10) == ["One text.", "Two.", "Three."]
    assert held_out_texts(txt, 2) == ["One text.", "Two."]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(json.dumps({"premise": "P.", "hypothesis": "H."}) + "\n" + '{"hypothesis": "x"}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:2: expected a JSON object with a 'premise'"):
        held_out_texts(jsonl, 10)
    with pytest.raises(FileNotFoundError, match="held-out text file"):
        held_out_texts(tmp_path / "missing.txt", 10)


def test_perplexity_matches_a_hand_computation(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir)
    texts = ["A dog runs in the park.", "Two women are drinking coffee at a small cafe today."]
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:  # one at a time, no padding
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            logits = model(ids).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert perplexity(model, tokenizer, texts, batch_size=2) == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_paraphrase_probe_rates(tiny_model_dir):
    from sempa_train.stages.embedding import load_encoder

    model, tokenizer = load_causal_lm(tiny_model_dir)
    probe = paraphrase_probe(TransformersBackend(model, tokenizer), tokenizer, ["A dog runs.", "A cat sleeps."],
                             load_encoder("all-minilm-l6-v2", show_progress=False), max_tokens=8)
    assert probe["n"] == 2 and 0 <= probe["copy_rate"] <= 1 and 0 <= probe["empty_rate"] <= 1
    assert len(probe["examples"]) == 2 and probe["examples"][0]["source"] == "A dog runs."


def test_lm_eval_is_skipped_with_a_reason(tmp_path):
    result = lm_eval_probe(tmp_path, None, ["hellaswag"], 10)
    assert "skipped" in result and ("not installed" in result["skipped"] or "failed" in result["skipped"])
    assert lm_eval_probe(tmp_path, None, [], None) == {"skipped": "no lm-eval tasks configured"}


def test_gates_name_metric_threshold_and_value():
    base = {"perplexity": 100.0, "paraphrase": {"similarity_mean": 0.8, "copy_rate": 0.1, "empty_rate": 0.0}}
    tuned = {"perplexity": 110.0, "paraphrase": {"similarity_mean": 0.7, "copy_rate": 0.1, "empty_rate": 0.0}}
    summary = {"sts": {"delta": -0.5}, "retention": {"compare": compare(base, tuned)}}
    assert gate_failures(summary, GateConfig()) == []
    failures = gate_failures(summary, GateConfig(min_sts_delta=0.0, max_perplexity_ratio=1.05,
                                                 min_paraphrase_similarity_delta=-0.05))
    assert failures == [
        "sts_avg_delta = -0.50 is below the minimum +0.00",
        "perplexity_ratio = 1.100 is above the maximum 1.050",
        "paraphrase_similarity_delta = -0.100 is below the minimum -0.050",
    ]
    assert gate_failures(summary, GateConfig(min_sts_delta=-1.0, max_perplexity_ratio=1.2)) == []
