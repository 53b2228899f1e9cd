"""The shared-prompt DPO trainer computes TRL's loss, faster; reference log-probs are cached by content."""

import json

import pytest
import torch

from sempa_train.core.config import TrainConfig
from sempa_train.stages.fast_dpo import SharedPromptDPOTrainer, common_prefix_length, head_logits, pack_pairs
from sempa_train.stages.train import train_dpo


def test_pack_pairs_layout():
    # two pairs, right padded like TRL's collator: rows 0-1 prompt+chosen, rows 2-3 prompt+rejected (pad 0)
    input_ids = torch.tensor([[5, 6, 7, 8, 0], [5, 9, 10, 0, 0], [5, 6, 11, 12, 0], [5, 9, 13, 14, 0]])
    attention = (torch.arange(5) < torch.tensor([[4], [3], [4], [4]])).long()
    prompt_len = torch.tensor([[2], [2], [2], [2]])  # prompts (5, 6) and (5, 9)
    labels = input_ids.masked_fill((torch.arange(5) < prompt_len) | (attention == 0), -100)
    packed = pack_pairs(input_ids, attention, labels)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 11, 12], [5, 9, 10, 13, 14, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 3], [0, 1, 2, 2, 3, 0]]
    mask = packed.attention_mask[0, 0]
    assert mask[4].tolist() == [True, True, False, False, True, False]  # rejected sees the prompt, not the chosen
    assert mask[3].tolist() == [True, True, True, True, False, False]  # chosen is causal as usual
    assert packed.attention_mask[1, 0, :5, 5].tolist() == [False] * 5  # nobody attends to padding
    # chosen of pair 0, chosen of pair 1, rejected of pair 0, rejected of pair 1; the first answer token of each
    # is predicted by the last prompt token (position 1)
    assert packed.source_row.tolist() == [0, 0, 1, 0, 0, 1, 1]
    assert packed.source_pos.tolist() == [1, 2, 1, 1, 4, 1, 3]
    assert packed.target.tolist() == [7, 8, 10, 11, 12, 13, 14]


def test_common_prefix_stops_where_rows_differ_or_a_log_prob_is_read():
    # two pairs with the prompt (5, 6, 7): rows 0-1 prompt+chosen, rows 2-3 prompt+rejected (pad 0)
    input_ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 7, 9, 10], [5, 6, 7, 11, 0], [5, 6, 7, 12, 0]])
    attention = (input_ids != 0).long()
    labels = input_ids.masked_fill((torch.arange(5) < 3) | (attention == 0), -100)
    packed = pack_pairs(input_ids, attention, labels)
    assert common_prefix_length(packed) == 2  # (5, 6, 7) is shared, but position 2 predicts the first answer token
    packed = pack_pairs(input_ids[[0, 2]], attention[[0, 2]], labels[[0, 2]])  # one pair: nothing to share
    assert common_prefix_length(packed) == 0


def test_pack_pairs_refuses_different_prompts():
    input_ids = torch.tensor([[5, 6, 7], [5, 8, 7]])
    labels = torch.tensor([[-100, -100, 7], [-100, -100, 7]])
    assert pack_pairs(input_ids, torch.ones_like(input_ids), labels) is None


def test_frozen_lm_head_is_cast_once_under_autocast_and_again_when_it_changes():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(head_logits(hidden, head), head(hidden))  # the same rounding autocast makes
        cast = head._sempa_autocast_weight[1]
        head_logits(hidden, head)
        assert head._sempa_autocast_weight[1] is cast  # reused, not cast again
        with torch.no_grad():
            head.weight.mul_(2)  # an in-place change bumps the version: cast again
        assert torch.equal(head_logits(hidden, head), head(hidden))
        assert head._sempa_autocast_weight[1] is not cast
    head_logits(hidden, head).sum().backward()  # fp32 outside autocast, gradients reach the hidden states
    assert hidden.grad is not None
    trained = torch.nn.Linear(16, 50, bias=False)  # a head that trains is left to autocast's own cache
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(head_logits(hidden, trained), trained(hidden))
    assert not hasattr(trained, "_sempa_autocast_weight")


def _trainers(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from sempa_train.core.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir, padding_side="right")
    records = [{"prompt": [{"role": "user", "content": f"Keep the meaning of sentence {i}: a dog runs."}],
                "chosen": [{"role": "assistant", "content": "A dog is running." + " fast" * (i % 3)}],
                "rejected": [{"role": "assistant", "content": "A cat sleeps" + " now" * i}]} for i in range(8)]
    trainers = []
    for cls in (DPOTrainer, SharedPromptDPOTrainer):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        args = DPOConfig(output_dir=str(tmp_path / cls.__name__), use_cpu=True, bf16=False, max_steps=1,
                         per_device_train_batch_size=4, report_to=[], max_length=64)
        trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer,
                      peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
        generator = torch.Generator().manual_seed(0)
        for name, param in sorted(trainer.model.named_parameters()):
            if "lora_B" in name:  # non-zero adapters, so policy and reference differ
                param.data = torch.randn(param.shape, generator=generator) * 0.05
        trainers.append(trainer)
    return trainers


def test_shared_prompt_forward_gives_trls_loss_metrics_and_gradients(tiny_model_dir, tmp_path):
    plain, shared = _trainers(tiny_model_dir, tmp_path)
    batch = plain.data_collator([plain.train_dataset[i] for i in range(4)])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    packed = pack_pairs(batch["input_ids"], batch["attention_mask"], labels)
    assert common_prefix_length(packed) > 5  # the chat template and instruction run once for the batch
    results = []
    for trainer in (plain, shared):
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}))
    (loss_a, grads_a, metrics_a), (loss_b, grads_b, metrics_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-5) and loss_a != pytest.approx(0.6931, abs=1e-3)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6)
    for key in ("logps/chosen", "logps/rejected", "rewards/margins", "entropy", "mean_token_accuracy"):
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=1e-4, abs=1e-5), key


def test_reference_pass_by_length_gives_trls_log_probs_in_row_order(tiny_model_dir, tmp_path):
    from trl import DPOTrainer

    plain, shared = _trainers(tiny_model_dir, tmp_path)  # answers of different lengths: sorting moves rows
    rows = plain.train_dataset
    expected = DPOTrainer._precompute_ref_logps(plain, rows, "train", 2)  # TRL's pass, rows in order
    got = shared._ref_logps_by_length(rows, "train", 3)
    assert got["prompt_ids"] == rows["prompt_ids"]
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(got[column]), torch.tensor(expected[column]), rtol=1e-5, atol=1e-4)


def test_train_matches_trl_first_step_and_caches_reference_logps(tiny_model_dir, sample_prefs, tmp_path,
                                                                 monkeypatch):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from sempa_train.core.io import read_dataset
    from sempa_train.core.models import load_tokenizer
    from sempa_train.stages.train import to_trl_records

    monkeypatch.setenv("SEMPA_CACHE_DIR", str(tmp_path / "cache"))  # an empty reference-log-prob cache
    cfg = TrainConfig(model=str(tiny_model_dir), max_steps=2, batch_size=4, learning_rate=1e-2, lora_dropout=0.0,
                      bf16=False)
    first = train_dpo(cfg, sample_prefs, tmp_path / "a")
    second = train_dpo(cfg, sample_prefs, tmp_path / "b")
    assert first.metrics["ref_log_probs_cached"] is False and second.metrics["ref_log_probs_cached"] is True
    assert first.metrics["ref_pass"] == "by_length"  # auto in fp32: the sorted pass gives the same numbers

    torch.manual_seed(cfg.seed)
    plain = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        args=DPOConfig(output_dir=str(tmp_path / "plain"), use_cpu=True, bf16=False, max_steps=2, learning_rate=1e-2,
                       warmup_steps=cfg.warmup_ratio, lr_scheduler_type="cosine", per_device_train_batch_size=4,
                       max_length=cfg.max_length, seed=cfg.seed, logging_steps=1, report_to=[], save_strategy="no"),
        train_dataset=Dataset.from_list(to_trl_records(read_dataset(sample_prefs, "preferences"), chat=True)),
        processing_class=load_tokenizer(tiny_model_dir, padding_side="right"),
        peft_config=LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                               target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    plain.train()
    reference = [h for h in plain.state.log_history if "loss" in h]
    for run in (first, second):
        logged = [json.loads(line) for line in (run.out_dir / "train_log.jsonl").read_text().splitlines()]
        logged = [h for h in logged if "loss" in h]
        assert logged[0]["loss"] == pytest.approx(reference[0]["loss"], abs=1e-3)
        assert logged[0]["logps/chosen"] == pytest.approx(reference[0]["logps/chosen"], rel=1e-4)
        # the second step depends on the first update: the same update gives the same numbers
        assert logged[1]["loss"] == pytest.approx(reference[1]["loss"], abs=1e-3)


def test_bf16_first_step_loss_is_log2_when_the_reference_runs_in_the_training_batch(
        tiny_model_dir, sample_prefs, tmp_path, monkeypatch):
    """In the training batch, policy and reference round alike at the first step. A large beta magnifies any
    difference in rounding: with ref_pass=by_length this lands 1.9e-4 from log 2 (Zen 4, when written)."""
    import math

    monkeypatch.setenv("SEMPA_CACHE_DIR", str(tmp_path / "cache"))
    cfg = TrainConfig(model=str(tiny_model_dir), max_steps=1, batch_size=4, bf16=True, beta=50.0)
    result = train_dpo(cfg, sample_prefs, tmp_path / "model")
    first = json.loads((result.out_dir / "train_log.jsonl").read_text().splitlines()[0])["loss"]
    assert result.metrics["ref_pass"] == "in_batch"  # auto under bf16
    assert first == pytest.approx(math.log(2), abs=1e-6)


def test_bf16_training_on_cpu_computes_attention_in_fp32_unless_told_not_to(tiny_model_dir, sample_prefs, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("SEMPA_CACHE_DIR", str(tmp_path / "cache"))
    cfg = TrainConfig(model=str(tiny_model_dir), max_steps=1, batch_size=4, bf16=True)
    default = train_dpo(cfg, sample_prefs, tmp_path / "default")
    plain = train_dpo(cfg.replace(attention_fp32=False), sample_prefs, tmp_path / "plain")
    fp32 = train_dpo(cfg.replace(bf16=False), sample_prefs, tmp_path / "fp32")  # nothing to change in fp32
    assert (default.metrics["attention"], plain.metrics["attention"], fp32.metrics["attention"]) == \
        ("fp32", "sdpa", "sdpa")
    # the reference log-probs depend on attention's precision: the second run computes its own
    assert (default.metrics["ref_log_probs_cached"], plain.metrics["ref_log_probs_cached"]) == (False, False)
    logps = [json.loads((run.out_dir / "train_log.jsonl").read_text().splitlines()[0])["logps/chosen"]
             for run in (default, plain)]
    assert logps[0] != logps[1]  # bf16 attention rounds differently
    assert not [f for f in default.out_dir.rglob("*.json") if "sempa_sdpa_fp32" in f.read_text()]


def test_fp32_attention_computes_the_bf16_inputs_in_fp32():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from sempa_train.stages.fp32_attention import sdpa_in_fp32

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 1, True, False
    q, k, v = (torch.randn(2, 3, 7, 16).to(torch.bfloat16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = sdpa_in_fp32(module, q, k, v, None)
        in_bf16, _ = sdpa_attention_forward(module, q, k, v, None)
    expected, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), None)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected.to(torch.bfloat16))
    assert not torch.equal(out, in_bf16)  # what the kernel computes in bf16 rounds differently


def test_in_batch_reference_log_probs_are_cached_by_row(tiny_model_dir, sample_prefs, tmp_path, monkeypatch,
                                                        caplog):
    import polars as pl

    from sempa_train.core.io import read_dataset

    monkeypatch.setenv("SEMPA_CACHE_DIR", str(tmp_path / "cache"))
    cfg = TrainConfig(model=str(tiny_model_dir), max_steps=1, batch_size=4, bf16=False, ref_pass="in_batch")
    first = train_dpo(cfg, sample_prefs, tmp_path / "a")
    (cache_file,) = (tmp_path / "cache" / "ref_logps").glob("*.parquet")
    cached = pl.read_parquet(cache_file)
    assert cached.height == read_dataset(sample_prefs, "preferences").height  # one row per pair, in row order
    assert cached.filter(~pl.col("ref_chosen_logps").is_nan()).height == 4  # only the rows step 1 trained on
    second = train_dpo(cfg, sample_prefs, tmp_path / "b")  # same seed, same first batch: nothing to compute
    longer = train_dpo(cfg.replace(max_steps=2), sample_prefs, tmp_path / "c")  # a second batch to compute
    assert (first.metrics["ref_log_probs_cached"], second.metrics["ref_log_probs_cached"],
            longer.metrics["ref_log_probs_cached"]) == (False, True, False)
    assert pl.read_parquet(cache_file).filter(~pl.col("ref_chosen_logps").is_nan()).height == 8
    assert second.metrics["final_loss"] == pytest.approx(first.metrics["final_loss"], abs=1e-6)
    cache_file.write_bytes(b"not parquet")  # a damaged cache file is ignored, computed again and replaced
    again = train_dpo(cfg, sample_prefs, tmp_path / "d")
    assert again.metrics["ref_log_probs_cached"] is False and str(cache_file) in caplog.text
    assert pl.read_parquet(cache_file).height == cached.height


@pytest.mark.parametrize(("loss", "extra"), [
    ("sigmoid,sft", {"loss_weights": (1.0, 0.5)}),
    ("apo_zero", {}), ("nca_pair", {}), ("bco_pair", {}), ("ipo", {"beta": 0.5}),
    ("sigmoid", {"dpop_lambda": 50.0}),
])
def test_each_objective_trains_and_logs(tiny_model_dir, sample_prefs, tmp_path, loss, extra):
    cfg = TrainConfig(model=str(tiny_model_dir), max_steps=2, batch_size=4, learning_rate=1e-2, loss_type=loss,
                      bf16=False, **extra)
    result = train_dpo(cfg, sample_prefs, tmp_path / "model")
    logged = [json.loads(line) for line in (result.out_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [h for h in logged if "loss" in h]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in steps)
    assert all("logps/chosen" in h and "rewards/chosen" in h for h in steps)
    if "dpop_lambda" in extra:
        assert all("dpop/shortfall" in h for h in steps)
    assert json.loads((result.out_dir / "config.json").read_text())["loss_type"] == loss


def test_dpo_positive_equals_dpo_without_a_shortfall(tiny_model_dir, sample_prefs, tmp_path):
    """At the first step policy = reference, so the shortfall is 0 and DPO-Positive's loss is DPO's."""
    plain = train_dpo(TrainConfig(model=str(tiny_model_dir), max_steps=1, batch_size=4, bf16=False),
                      sample_prefs, tmp_path / "dpo")
    dpop = train_dpo(TrainConfig(model=str(tiny_model_dir), max_steps=1, batch_size=4, bf16=False, dpop_lambda=5.0),
                     sample_prefs, tmp_path / "dpop")
    assert dpop.metrics["final_loss"] == pytest.approx(plain.metrics["final_loss"], abs=1e-6)


def test_objective_settings_are_checked():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        TrainConfig(loss_type="sigmoid,dpo")
    with pytest.raises(ValueError, match="one weight per loss_type"):
        TrainConfig(loss_type="sigmoid,sft", loss_weights=(1.0,))
    with pytest.raises(ValueError, match="dpop_lambda works on the sigmoid loss"):
        TrainConfig(loss_type="ipo", dpop_lambda=1.0)
