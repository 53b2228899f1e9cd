r"""Confirm a training recipe across seeds by a rule fixed before any result: run ``sempa run`` for each seed
in the order given, check the issue's four conditions on each finished run, and stop at the first seed that
misses them (a recipe is adopted only when every seed meets them).

    python tests/benchmarks/seed_sequence.py --name apo-sft-seeds --seeds 2 0 1 \
        --config sempa_train/configs/recipe_smollm2.yaml --set train.loss_type=apo_zero,sft \
        --out-prefix outputs/runs/apo-sft-seed

The four conditions (issue 12): Δ STS-B dev ≥ +3.0 with the paired-bootstrap 95 % interval's low end above
+1.0, Δ SICK trial ≥ 0, perplexity ratio ≤ 1.05 and greedy-paraphrase similarity no more than 0.02 below the
base model's. Seed N sets ``prepare``, ``sample``, ``rank`` and ``train`` seeds to N. A run folder that already
holds a ``summary.json`` is read, not re-run, so a stopped sequence resumes. Writes
``tests/benchmarks/results/<name>.json`` (the rule, each run's row as ``run_results.py`` makes it, and the
verdict) after every seed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import save
from run_results import run_row, table

SEEDED_SECTIONS = ("prepare", "sample", "rank", "train")
# The targets, fixed here rather than read from a run's ``gates`` section: a run config may set its own
# gates, and the verdict must not move with them.
TARGETS = {"min_sts_b_delta": 3.0, "min_sts_b_ci_low": 1.0, "min_sick_delta": 0.0, "max_perplexity_ratio": 1.05,
           "min_paraphrase_delta": -0.02}


def misses(row: dict[str, Any]) -> list[str]:
    """The conditions a ``run_results.run_row`` row misses, in words (empty when it meets all four)."""
    failed = []
    sts_b, sick = row["sts_delta"]["STSBenchmark"], row["sts_delta"]["SICKRelatedness"]
    if sts_b < TARGETS["min_sts_b_delta"]:
        failed.append(f"STS-B dev {sts_b:+.2f} < {TARGETS['min_sts_b_delta']:+.1f}")
    low = row["sts_delta_ci95"]["STSBenchmark"][0]
    if low <= TARGETS["min_sts_b_ci_low"]:
        failed.append(f"STS-B interval low end {low:+.2f} <= {TARGETS['min_sts_b_ci_low']:+.1f}")
    if sick < TARGETS["min_sick_delta"]:
        failed.append(f"SICK trial {sick:+.2f} < {TARGETS['min_sick_delta']:g}")
    if row["perplexity_ratio"] > TARGETS["max_perplexity_ratio"]:
        failed.append(f"perplexity ratio {row['perplexity_ratio']:.3f} > {TARGETS['max_perplexity_ratio']}")
    if row["paraphrase_similarity_delta"] < TARGETS["min_paraphrase_delta"]:
        failed.append(f"paraphrase similarity {row['paraphrase_similarity_delta']:+.3f} < "
                      f"{TARGETS['min_paraphrase_delta']}")
    return failed


def run_seed(seed: int, config: Path, overrides: list[str], folder: Path) -> None:
    """``sempa run`` for one seed into ``folder`` (a finished folder is left as it is)."""
    if (folder / "summary.json").is_file():
        print(f"seed {seed}: {folder} is finished, reading it", flush=True)
        return
    command = ["sempa", "run", "--config", str(config), "--out", str(folder)]
    for item in [f"{section}.seed={seed}" for section in SEEDED_SECTIONS] + overrides:
        command += ["--set", item]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="results file name")
    parser.add_argument("--config", type=Path, required=True, help="the run config (recipe) to confirm")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="seeds, in the order to run them")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="an override passed to every run (repeatable)")
    parser.add_argument("--out-prefix", required=True, help="run folders are <prefix><seed>")
    parser.add_argument("--keep-going", action="store_true",
                        help="run every seed even after a miss (to measure how often a recipe meets the conditions, "
                             "not to decide whether to adopt it)")
    args = parser.parse_args()
    rule = (f"seeds {args.seeds} in this order; "
            + ("every seed is run; the verdict counts the seeds that meet all four" if args.keep_going else
               "stop at the first seed that misses any condition; adopt only if every seed meets all four"))
    rows: list[dict[str, Any]] = []

    def record(verdict: str | None) -> None:
        save(args.name, {"rule": rule, "targets": TARGETS, "config": str(args.config), "overrides": args.overrides,
                         "runs": rows, "table": table(rows), "verdict": verdict})

    verdict = "every seed met all four conditions"
    for seed in args.seeds:
        folder = Path(f"{args.out_prefix}{seed}")
        run_seed(seed, args.config, args.overrides, folder)
        row = run_row(folder)
        row["misses"] = misses(row)
        rows.append(row)
        record(None)  # kept after every seed, so a stopped sequence leaves what it measured
        print(f"seed {seed}: " + ("meets all four" if not row["misses"] else "misses: " + "; ".join(row["misses"])),
              flush=True)
        if row["misses"] and not args.keep_going:
            verdict = f"stopped at seed {seed}: " + "; ".join(row["misses"])
            break
    if args.keep_going:
        met = [row["config_seeds"]["train"] for row in rows if not row["misses"]]
        verdict = f"{len(met)} of {len(rows)} seeds met all four conditions (seeds {met})"
    record(verdict)
    print(table(rows))
    print(verdict)
    sys.exit(0 if all(not row["misses"] for row in rows) else 1)


if __name__ == "__main__":
    main()
