"""DPO training throughput: TRL's plain ``DPOTrainer`` against ``sempa train --preset cpu``, side by side in one run.

    python tests/benchmarks/train_throughput.py --pairs 256 --steps 32

Same data (the first ``--pairs`` SNLI-dev gold pairs in P1 through the chat template), same model
(SmolLM2-135M-Instruct), same recipe (LoRA r8/a32 all-linear, lr 1e-4, beta 0.1, cosine, warmup 5 %,
batch 8, seed 0). Arms, each in its own process (so peak RSS is its own):

* ``trl_plain``: ``DPOTrainer`` as a user first writes it: TRL's defaults with ``use_cpu=True`` and
  ``bf16=False`` (fp32, a reference forward every step, gradient checkpointing, max_length 1024);
* ``sempa_cold``: ``train_dpo`` with the ``cpu`` preset and an empty reference-log-prob cache (``ref_pass=auto``:
  under bf16 the reference forward runs in the first epoch's steps, in fp32 as a pass in ``setup_seconds``);
* ``sempa_warm``: the same again, the reference log-probs now read from the cache;
* ``sempa_fp32``: the ``cpu`` preset forced to fp32 (what a CPU without bf16 units runs), its own empty cache
  (the key holds the precision);
* ``sempa_by_length`` / ``sempa_in_batch``: the ``cpu`` preset with ``ref_pass`` forced to ``by_length`` (a
  pass of its own before training, shortest pairs first) / ``in_batch``, each with its own empty cache;
* ``sempa_bf16_attention``: the ``cpu`` preset with ``attention_fp32: false`` (under bf16 autocast, attention in
  torch's bf16 kernel rather than in fp32), its own empty cache. In fp32 it is the same as ``sempa_cold``.

Reported per arm: seconds per step and pairs/s over the training loop, setup seconds, pairs/s including
setup, peak RSS, first-step loss and the reward-accuracy curve. Writes
``tests/benchmarks/results/train_throughput[-TAG].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import save

ARMS = ("trl_plain", "sempa_cold", "sempa_warm", "sempa_fp32", "sempa_by_length", "sempa_in_batch",
        "sempa_bf16_attention")
ARM_SETTINGS = {"sempa_cold": {}, "sempa_warm": {}, "sempa_fp32": {"bf16": False},
                "sempa_by_length": {"ref_pass": "by_length"}, "sempa_in_batch": {"ref_pass": "in_batch"},
                "sempa_bf16_attention": {"attention_fp32": False}}
RECIPE = {"learning_rate": 1e-4, "beta": 0.1, "warmup_ratio": 0.05, "lr_scheduler": "cosine", "batch_size": 8,
          "seed": 0}


def run_arm(arm: str, data: Path, model: str, steps: int, work: Path) -> dict[str, Any]:
    """Train one arm in this process and return its timings and log."""
    from sempa_train.core.config import TrainConfig

    started = time.perf_counter()
    if arm == "trl_plain":
        history, setup = _trl_plain(data, model, steps, work / arm)
        attention = "sdpa"
    else:
        from sempa_train.stages.train import train_dpo

        cfg = TrainConfig.preset("cpu").replace(model=model, max_steps=steps, **RECIPE, **ARM_SETTINGS[arm])
        result = train_dpo(cfg, data, work / arm)
        history = [json.loads(line) for line in (result.out_dir / "train_log.jsonl").read_text().splitlines()]
        setup = result.metrics["setup_seconds"]
        attention = result.metrics["attention"]
    wall = time.perf_counter() - started
    logged = [h for h in history if "loss" in h]
    runtime = next(h["train_runtime"] for h in history if "train_runtime" in h)
    pairs = steps * RECIPE["batch_size"]
    return {
        "steps": steps, "train_seconds": round(runtime, 1), "seconds_per_step": round(runtime / steps, 2),
        "pairs_per_second": round(pairs / runtime, 2), "setup_seconds": round(setup, 1),
        "pairs_per_second_incl_setup": round(pairs / (runtime + setup), 2), "wall_seconds": round(wall, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "first_step_loss": logged[0]["loss"], "final_loss": logged[-1]["loss"], "attention": attention,
        "reward_accuracies": [h["rewards/accuracies"] for h in logged],
        "logps_chosen": [h["logps/chosen"] for h in logged],
    }


def _trl_plain(data: Path, model: str, steps: int, out: Path) -> tuple[list[dict[str, Any]], float]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from sempa_train.core.io import read_dataset
    from sempa_train.core.models import load_tokenizer, resolve_model
    from sempa_train.stages.train import to_trl_records

    path = resolve_model(model)
    tokenizer = load_tokenizer(path, padding_side="right")
    started = time.perf_counter()
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        args=DPOConfig(output_dir=str(out), use_cpu=True, bf16=False, max_steps=steps, learning_rate=1e-4, beta=0.1,
                       warmup_steps=0.05, lr_scheduler_type="cosine", per_device_train_batch_size=8, seed=0,
                       logging_steps=1, save_strategy="no", report_to=[]),
        train_dataset=Dataset.from_list(to_trl_records(read_dataset(data, "preferences"), chat=True)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                               task_type="CAUSAL_LM"),
    )
    setup = time.perf_counter() - started
    trainer.train()
    return trainer.state.log_history, setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="../shared/data/nli/snli/validation.jsonl")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32, help="optimiser steps per arm (32 x 8 = 256 pairs)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--tag", default="")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm and print its JSON
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        parser.error(f"--arms: unknown {', '.join(sorted(unknown))}; known: {', '.join(ARMS)}")
    if args.arm:
        print("RESULT " + json.dumps(run_arm(args.arm, Path(args.data), args.model, args.steps, Path(args.work))))
        return

    from sempa_train.core.config import PrepareConfig
    from sempa_train.core.models import resolve_model
    from sempa_train.stages.prepare import prepare

    model = str(resolve_model(args.model))  # converted once, outside the timed arms
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepared = prepare(PrepareConfig(source=args.source, max_premises=args.pairs), work / "data")
        env = {**os.environ, "SEMPA_CACHE_DIR": str(work / "cache")}  # an empty reference-log-prob cache
        results: dict[str, Any] = {}
        for arm in args.arms.split(","):
            cmd = [sys.executable, __file__, "--arm", arm, "--data", str(prepared.preferences_dir), "--work", str(work),
                   "--model", model, "--steps", str(args.steps)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{arm} failed:\n{proc.stderr[-3000:]}")
            results[arm] = json.loads(line.removeprefix("RESULT "))
            print(f"{arm}: {results[arm]['seconds_per_step']} s/step, {results[arm]['pairs_per_second']} pairs/s, "
                  f"setup {results[arm]['setup_seconds']} s, first loss {results[arm]['first_step_loss']:.4f}",
                  flush=True)
    if "trl_plain" in results:
        plain = results["trl_plain"]
        for row in results.values():
            row["speedup_vs_trl_plain"] = round(row["pairs_per_second"] / plain["pairs_per_second"], 2)
            row["speedup_incl_setup_vs_trl_plain"] = round(
                row["pairs_per_second_incl_setup"] / plain["pairs_per_second_incl_setup"], 2)
            row["first_step_loss_diff"] = round(abs(row["first_step_loss"] - plain["first_step_loss"]), 6)
            row["mean_reward_accuracy"] = round(sum(row["reward_accuracies"]) / len(row["reward_accuracies"]), 3)
    save("train_throughput", {"model": args.model, "pairs": args.pairs, "steps": args.steps, "recipe": RECIPE,
                              "results": results}, tag=args.tag)


if __name__ == "__main__":
    main()
