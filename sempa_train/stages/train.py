"""The train stage: DPO with LoRA on a preference dataset, through TRL's ``DPOTrainer``.

Output folder (written as one unit when training finishes)::

    OUT/adapter/         the LoRA adapter (peft format), the tokenizer and README.md, its model card
    OUT/merged/          base + adapter merged into a plain model folder (with save_merged)
    OUT/train_log.jsonl  TRL's log, one JSON object per logging step (loss, rewards/margins, ...)
    OUT/checkpoints.jsonl  with eval_every: STS and perplexity of every probed step (and scale); the adapter
                         is the best one within the perplexity gate (``sempa_train.stages.checkpoints``)
    OUT/metrics.json     summary: steps, runtime, final loss / reward accuracy / margin
    OUT/config.json      the resolved TrainConfig
    OUT/manifest.json    what produced it: base model, data folder and hash, config, code version
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from transformers import TrainerCallback

from sempa_train.core.config import TrainConfig
from sempa_train.core.io import (
    code_version,
    file_sha256,
    now_iso,
    read_dataset,
    read_manifest,
    replace_dir,
    resolve_dataset_file,
    write_json,
    write_text,
)
from sempa_train.core.models import (
    cache_dir,
    cpu_has_fast_bf16,
    load_tokenizer,
    resolve_device,
    resolve_model,
    use_chat_template,
    weights_kwargs,
)
from sempa_train.core.templates import PLAIN_SEPARATOR
from sempa_train.core.threads import follow_load
from sempa_train.stages.checkpoints import CheckpointProbe, Probes, SelectionGate, select_and_install
from sempa_train.stages.model_card import write_model_card

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """Where the trained adapter and logs are, and the summary metrics."""

    out_dir: Path
    metrics: dict[str, Any]

    @property
    def adapter_dir(self) -> Path:
        return self.out_dir / "adapter"


class FollowLoad(TrainerCallback):
    """After each DPO step on CPU: torch's threads fitted to the cores other processes leave free
    (``sempa_train.core.threads``), so a busy neighbour does not make every step wait for a shared core."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        follow_load()


def to_trl_records(df: pl.DataFrame, *, chat: bool) -> list[dict[str, Any]]:
    """The ``prompt``/``chosen``/``rejected`` records TRL expects.

    With ``chat`` the prompt becomes a user message and the answers assistant messages, so TRL renders
    them through the tokenizer's chat template; otherwise the prompt ends with a newline and TRL
    concatenates the plain strings.
    """
    if chat:
        return [
            {"prompt": [{"role": "user", "content": p}],
             "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]}
            for p, c, r in df.select("prompt", "chosen", "rejected").iter_rows()
        ]
    return [{"prompt": p + PLAIN_SEPARATOR, "chosen": c, "rejected": r}
            for p, c, r in df.select("prompt", "chosen", "rejected").iter_rows()]


def summarize_log(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Final training metrics from TRL's log history (last logged value of each key)."""
    steps = [h for h in history if "loss" in h]
    summary: dict[str, Any] = {"logged_steps": len(steps)}
    for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        values = [h[key] for h in steps if key in h]
        if values:
            summary[f"final_{key.replace('/', '_')}"] = values[-1]
    for h in history:
        for key in ("train_runtime", "train_loss", "train_samples_per_second"):
            if key in h:
                summary[key] = h[key]
    summary["global_steps"] = max((h.get("step", 0) for h in history), default=0)
    return summary


def accumulation_steps(cfg: TrainConfig, processes: int) -> int:
    """Gradient accumulation that keeps ``effective_batch_size`` whatever the number of processes."""
    if cfg.effective_batch_size is None:
        return cfg.gradient_accumulation_steps
    per_step = cfg.batch_size * processes
    if cfg.effective_batch_size % per_step:
        raise ValueError(f"effective_batch_size {cfg.effective_batch_size} is not a multiple of batch_size "
                         f"{cfg.batch_size} x {processes} processes")
    return cfg.effective_batch_size // per_step


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """``cfg.bf16``, or when unset: bf16 autocast where the device has bf16 matrix units (a CUDA GPU that supports
    it, a CPU with AVX512-BF16 or AMX), fp32 elsewhere (bf16 is emulated, and slow, on an AVX2-only CPU)."""
    if cfg.bf16 is not None:
        return cfg.bf16
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()


def use_fp32_attention_in_step(cfg: TrainConfig, device: torch.device, bf16: bool) -> bool:
    """``cfg.attention_fp32``, or when unset: on a CPU under bf16 autocast, where torch's bf16 attention kernel
    (its backward above all) is slower than the same attention in fp32 (``stages/fp32_attention.py``)."""
    if not bf16:
        return False
    return cfg.attention_fp32 if cfg.attention_fp32 is not None else device.type == "cpu"


def build_dpo_config(cfg: TrainConfig, output_dir: Path, device: torch.device, processes: int = 1) -> Any:
    """TRL's ``DPOConfig`` for ``cfg`` (CPU: ``use_cpu``; bf16 as ``use_bf16`` decides)."""
    from trl import DPOConfig

    bf16 = use_bf16(cfg, device)
    return DPOConfig(
        output_dir=str(output_dir),
        beta=cfg.beta,
        loss_type=list(cfg.loss_types),
        loss_weights=list(cfg.loss_weights) if cfg.loss_weights else None,
        ld_alpha=cfg.ld_alpha,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a value below 1 is a fraction of the steps
        lr_scheduler_type=cfg.lr_scheduler,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=accumulation_steps(cfg, processes),
        max_length=cfg.max_length,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        precompute_ref_batch_size=cfg.ref_batch_size,
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=bf16,
        use_cpu=device.type == "cpu",
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
    )


def _checkpoint_probe(cfg: TrainConfig, tokenizer: Any, checkpoint_dir: Path, bf16: bool,
                      processes: int, chat: bool) -> CheckpointProbe | None:
    """The in-training probe ``cfg.eval_every`` asks for (single process only), or None."""
    if not cfg.eval_every:
        return None
    if processes > 1:
        raise ValueError("eval_every (checkpoint selection) runs in a single process; launch without accelerate")
    probes = Probes.load(cfg.eval_senteval_dir, cfg.eval_sts_pairs, cfg.eval_text_file, cfg.eval_texts, cfg.seed,
                         cfg.eval_sts_split, paraphrases=cfg.eval_paraphrases, template=cfg.eval_template, chat=chat,
                         offset=cfg.eval_text_offset, tasks=cfg.eval_sts_tasks, genre_mix=cfg.eval_sts_genre_mix)
    return CheckpointProbe(tokenizer, probes, cfg.eval_every, checkpoint_dir, bf16=bf16)


def train_dpo(cfg: TrainConfig, data: Path, out_dir: Path, *, overwrite: bool = False) -> TrainResult:
    """Train a LoRA adapter with DPO on the preference dataset at ``data`` and write ``out_dir``."""
    from accelerate import PartialState
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from sempa_train.stages.fast_dpo import SharedPromptDPOTrainer
    from sempa_train.stages.fp32_attention import use_fp32_attention

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    df = read_dataset(data, "preferences")
    if df.is_empty():
        raise ValueError(f"{data}: the preference dataset is empty")
    device = resolve_device(cfg.device)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path, padding_side="right")
    chat = use_chat_template(cfg.chat_template, tokenizer)
    targets = cfg.lora_target_modules
    peft_config = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, **weights_kwargs(model_path))
    attention = "fp32" if use_fp32_attention_in_step(cfg, device, use_bf16(cfg, device)) \
        and use_fp32_attention(model) else model.config._attn_implementation
    log.info("train: %s triples, model %s on %s, chat template %s, attention %s", f"{df.height:,}", cfg.model,
             device, "on" if chat else "off", attention)

    # Every process of a distributed launch (accelerate launch) trains; only the main one writes. They
    # share one temporary folder beside the output, renamed into place when training has finished.
    state = PartialState(cpu=device.type == "cpu")
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    if state.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_text(tmp / "train.jsonl", "".join(json.dumps(r) + "\n" for r in to_trl_records(df, chat=chat)))
    state.wait_for_everyone()
    try:
        # A file-backed dataset with one cache folder: the main process tokenizes, the others reuse its cache.
        with state.main_process_first():
            train_dataset = load_dataset("json", data_files=str(tmp / "train.jsonl"), split="train",
                                         cache_dir=str(tmp / "hf_cache"))
        ref_cache = cache_dir() / "ref_logps" if cfg.precompute_ref_log_probs and cfg.cache_ref_log_probs else None
        started = time.perf_counter()
        trainer = SharedPromptDPOTrainer(
            model=model, args=build_dpo_config(cfg, tmp / "trainer", device, state.num_processes),
            train_dataset=train_dataset, processing_class=tokenizer, peft_config=peft_config,
            share_prompt=cfg.share_prompt, ref_pass=cfg.ref_pass, ref_cache_dir=ref_cache, dpop_lambda=cfg.dpop_lambda,
        )
        setup_seconds = time.perf_counter() - started
        checkpoints = _checkpoint_probe(cfg, tokenizer, tmp / "checkpoints", trainer.args.bf16, state.num_processes,
                                        chat)
        if checkpoints is not None:
            trainer.add_callback(checkpoints)
        if device.type == "cpu" and state.num_processes == 1:  # several processes: OMP_NUM_THREADS set per process
            follow_load()  # before the reference pass, then after every step
            trainer.add_callback(FollowLoad())
        trainer.train()
        history = trainer.state.log_history
        metrics = {**summarize_log(history), "setup_seconds": round(setup_seconds, 1), "bf16": trainer.args.bf16,
                   "attention": attention,
                   "ref_pass": trainer.ref_pass_used, "ref_log_probs_cached": trainer.ref_cache_hit}
        if checkpoints is None:
            trainer.save_model(str(tmp / "adapter"))  # collective under DeepSpeed; writes on the main process
        else:
            gate = SelectionGate(cfg.select_max_perplexity_ratio, cfg.select_min_paraphrase_delta)
            chosen, probes = select_and_install(checkpoints, trainer.model, tmp, scales=cfg.select_scales, gate=gate,
                                                scale_margin=cfg.select_scale_margin)
            write_text(tmp / "checkpoints.jsonl", "".join(json.dumps(p) + "\n" for p in probes))
            metrics.update(selected_step=chosen.step, selected_scale=chosen.scale,
                           selected_sts_spearman=chosen.sts_spearman,
                           selected_perplexity_ratio=chosen.perplexity_ratio,
                           selected_paraphrase_delta=chosen.paraphrase_delta)
            log.info("train: selected step %d at scale %.2f (STS probe %.2f, perplexity ratio %.3f)",
                     chosen.step, chosen.scale, chosen.sts_spearman, chosen.perplexity_ratio)
        if state.is_main_process:
            tokenizer.save_pretrained(tmp / "adapter")
            write_text(tmp / "train_log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
            write_json(tmp / "metrics.json", metrics)
            write_json(tmp / "config.json", cfg.to_dict())
            data_manifest = read_manifest(Path(data))
            write_json(tmp / "manifest.json", {
                "kind": "model",
                "base_model": cfg.model,
                "base_model_path": str(model_path),
                "adapter": "adapter",
                "chat_template": chat,
                "data": str(data),
                "data_sha256": data_manifest.get("data_sha256") or file_sha256(resolve_dataset_file(Path(data))),
                "triples": df.height,
                "processes": state.num_processes,
                "effective_batch_size": cfg.batch_size * trainer.args.gradient_accumulation_steps * state.num_processes,
                "config": cfg.to_dict(),
                "metrics": metrics,
                "code_version": code_version(),
                "created_at": now_iso(),
            })
            write_model_card(tmp / "adapter", tmp)  # replaces peft's empty template
            if cfg.save_merged:
                merged = trainer.model.merge_and_unload()
                merged.save_pretrained(tmp / "merged")
                tokenizer.save_pretrained(tmp / "merged")
            for scratch in ("trainer", "hf_cache", "train.jsonl", "checkpoints"):
                path = tmp / scratch
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            replace_dir(tmp, out_dir)
        state.wait_for_everyone()
    except BaseException:
        if state.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("train: %s steps in %.0fs; final loss %.4f, reward accuracy %.3f, margin %.4f",
             metrics.get("global_steps"), metrics.get("train_runtime", 0.0), metrics.get("final_loss", float("nan")),
             metrics.get("final_rewards_accuracies", float("nan")), metrics.get("final_rewards_margins", float("nan")))
    return TrainResult(out_dir=out_dir, metrics=metrics)

