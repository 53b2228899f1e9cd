"""Where a DPO training step spends its time: torch's profiler over ``sempa train --preset cpu``, grouped by kind.

    python tests/benchmarks/train_profile.py --pairs 96 --steps 9 --profile-steps 4-8

Trains SmolLM2-135M-Instruct with the ``cpu`` preset (LoRA r8 all-linear, batch 8, the shared-prompt forward,
reference log-probs computed once before training, not cached) on the first ``--pairs`` SNLI-dev gold pairs,
and profiles the optimiser steps ``--profile-steps`` (after warm-up). The operators' own CPU time is summed into
matrix products, attention and the rest (``common.profile_summary``): how much of a step a faster number format
could shrink. ``--bf16 false`` forces fp32 where the CPU has bf16 units. Writes
``tests/benchmarks/results/train_profile[-TAG].json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import profile_summary, save

from sempa_train.core.config import PrepareConfig, TrainConfig
from sempa_train.core.models import resolve_model
from sempa_train.stages import fast_dpo
from sempa_train.stages.prepare import prepare
from sempa_train.stages.train import train_dpo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="../shared/data/nli/snli/validation.jsonl")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--profile-steps", default="4-8", help="first-last optimiser step to profile (1-based)")
    parser.add_argument("--bf16", choices=["auto", "false"], default="auto")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    first, last = (int(k) for k in args.profile_steps.split("-"))
    if not 1 <= first <= last <= args.steps:
        parser.error(f"--profile-steps {args.profile_steps}: must lie within 1-{args.steps}")

    step_seconds: list[float] = []
    profiler = torch.profiler.profile()
    plain_step = fast_dpo.SharedPromptDPOTrainer.training_step

    def timed_step(self: Any, *step_args: Any, **kwargs: Any) -> Any:
        if len(step_seconds) + 1 == first:
            profiler.__enter__()
        start = time.perf_counter()
        loss = plain_step(self, *step_args, **kwargs)
        step_seconds.append(time.perf_counter() - start)
        if len(step_seconds) == last:
            profiler.__exit__(None, None, None)
        return loss

    fast_dpo.SharedPromptDPOTrainer.training_step = timed_step
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepared = prepare(PrepareConfig(source=args.source, max_premises=args.pairs), work / "data")
        cfg = TrainConfig.preset("cpu").replace(model=str(resolve_model(args.model)), max_steps=args.steps, seed=0,
                                                cache_ref_log_probs=False,
                                                **({"bf16": False} if args.bf16 == "false" else {}))
        result = train_dpo(cfg, prepared.preferences_dir, work / "out")
    profiled = step_seconds[first - 1 : last]
    save("train_profile", {
        "model": args.model, "pairs": args.pairs, "steps": args.steps, "profiled_steps": [first, last],
        "bf16": result.metrics.get("bf16", args.bf16), "step_seconds": [round(s, 2) for s in step_seconds],
        "profiled_seconds_per_step": round(sum(profiled) / len(profiled), 2),
        **profile_summary(profiler),
    }, tag=args.tag)


if __name__ == "__main__":
    main()
