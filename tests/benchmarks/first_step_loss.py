"""How far the first DPO step's loss lies from log 2 with each way of computing the reference log-probs.

    python tests/benchmarks/first_step_loss.py --pairs 256

At the first step policy and reference are the same model, so the loss is exactly log 2 (0.69315) when both
log-probs are computed alike; what it differs by is how differently the reference and the policy pass round.
``sempa train --preset cpu`` runs two steps on the first ``--pairs`` SNLI-dev gold pairs (the recipe of
``train_throughput.py``, seed 0) once per variant:

* ``in_batch``: reference log-probs computed in the training batch itself (what ``ref_pass=auto`` runs in bf16);
* ``in_batch_without_common_opening``: the same with the batch's common opening not run once
  (``common_prefix_length`` replaced by 0 in this process);
* ``by_length``: a pass of its own before training, shortest pairs first (what ``auto`` runs in fp32);
* ``by_row_order``: that pass over the rows in their own order (TRL's ``_precompute_ref_logps`` in place of
  ``_ref_logps_by_length``).

In fp32 (``--bf16 false``) every variant gives log 2 within 1e-6; in bf16 (where the CPU has bf16 units, or
``--bf16 true``) a pass of its own rounds differently from the training batch. Writes
``tests/benchmarks/results/first_step_loss[-TAG].json``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from common import save
from trl import DPOTrainer

from sempa_train.core.config import PrepareConfig, TrainConfig
from sempa_train.core.models import resolve_model
from sempa_train.stages import fast_dpo
from sempa_train.stages.prepare import prepare
from sempa_train.stages.train import train_dpo

VARIANTS = {"in_batch": ("in_batch", True), "in_batch_without_common_opening": ("in_batch", False),
            "by_length": ("by_length", True), "by_row_order": ("by_row_order", True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="../shared/data/nli/snli/validation.jsonl")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--bf16", choices=["auto", "true", "false"], default="auto")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if not Path(args.source).is_file():
        parser.error(f"--source {args.source}: no such file")

    prefix_length, by_length = fast_dpo.common_prefix_length, fast_dpo.SharedPromptDPOTrainer._ref_logps_by_length
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepared = prepare(PrepareConfig(source=args.source, max_premises=args.pairs), work / "data")
        for name, (ref_pass, common_opening) in VARIANTS.items():
            fast_dpo.common_prefix_length = prefix_length if common_opening else (lambda packed: 0)
            fast_dpo.SharedPromptDPOTrainer._ref_logps_by_length = \
                DPOTrainer._precompute_ref_logps if ref_pass == "by_row_order" else by_length
            cfg = TrainConfig.preset("cpu").replace(
                model=str(resolve_model(args.model)), max_steps=2, learning_rate=1e-4, beta=0.1, warmup_ratio=0.05,
                lr_scheduler="cosine", batch_size=8, seed=0, cache_ref_log_probs=False,
                ref_pass="in_batch" if ref_pass == "in_batch" else "by_length",
                **({} if args.bf16 == "auto" else {"bf16": args.bf16 == "true"}))
            result = train_dpo(cfg, prepared.preferences_dir, work / name)
            logged = [json.loads(line) for line in (result.out_dir / "train_log.jsonl").read_text().splitlines()]
            first = next(h["loss"] for h in logged if "loss" in h)
            results[name] = {"bf16": result.metrics["bf16"], "ref_pass": ref_pass, "first_step_loss": first,
                             "difference_from_log2": round(first - math.log(2), 6)}
            print(name, results[name], flush=True)
    save("first_step_loss", {"model": args.model, "pairs": args.pairs, "variants": results}, tag=args.tag)


if __name__ == "__main__":
    main()
