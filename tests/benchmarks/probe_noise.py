"""How large a difference between two scales of one adapter the in-training STS probe can resolve.

Checkpoint selection ranks probed candidates by the probe's mean Spearman over a seeded subset of STS
train pairs (``train.eval_sts_pairs`` of each of ``train.eval_sts_tasks``). Two candidates that differ by
less than the probe's sampling noise are ranked by chance. This script re-encodes the probe pairs of a
finished ``sempa run`` with its selected adapter at several scales and reports each scale's probe score
and, for each scale against the reference scale, the paired-bootstrap standard deviation and 95 %
interval of the difference (pairs resampled with replacement, the same resample for both scales):

    python tests/benchmarks/probe_noise.py outputs/runs/quick-aligned-seed0 --scales 0.5 1.0

``--scales`` are scales of the *trained* update; the run's adapter (``eval/adapter``) already carries
its selected scale, which is divided out. Writes ``tests/benchmarks/results/probe_noise[-TAG].json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from common import save

from sempa_train.core.io import read_json
from sempa_train.core.models import load_causal_lm
from sempa_train.stages.checkpoints import Probes, lora_scaled, sts_similarities
from sempa_train.stages.evaluation import spearman100


def mean_difference_bootstrap(golds: list[np.ndarray], a: list[np.ndarray], b: list[np.ndarray], *,
                              samples: int = 1000, seed: int = 0) -> np.ndarray:
    """Bootstrap samples of ``mean Spearman(b) - mean Spearman(a)`` over the subsets, each subset's pairs
    resampled with replacement (the same resample for ``a`` and ``b``)."""
    rng = np.random.default_rng(seed)
    deltas = np.empty(samples)
    for i in range(samples):
        parts = []
        for gold, x, y in zip(golds, a, b, strict=True):
            idx = rng.integers(0, len(gold), len(gold))
            parts.append(spearman100(y[idx], gold[idx]) - spearman100(x[idx], gold[idx]))
        deltas[i] = float(np.mean(parts))
    return deltas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished `sempa run` folder (its summary.json and eval/adapter)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0],
                        help="scales of the trained update to probe; the first is the reference")
    parser.add_argument("--samples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    summary = read_json(args.run / "summary.json")
    train_cfg, train = summary["config"]["train"], summary["train"]
    probes = Probes.load(train_cfg["eval_senteval_dir"], train_cfg["eval_sts_pairs"], train_cfg["eval_text_file"],
                         0, train_cfg["seed"], train_cfg["eval_sts_split"], offset=train_cfg["eval_text_offset"],
                         tasks=train_cfg["eval_sts_tasks"])
    model, tokenizer = load_causal_lm(train_cfg["model"], adapter=args.run / "eval" / "adapter", merge=False)
    bf16 = bool(train.get("bf16"))
    saved_scale = train["selected_scale"] * summary["config"]["eval"]["adapter_scale"]
    golds = [subset.scores for subset in probes.sts]
    similarities = {}
    for scale in args.scales:
        with lora_scaled(model, scale / saved_scale), torch.no_grad(), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as the in-training probe runs
            similarities[scale] = sts_similarities(model, tokenizer, probes)
    scores = {scale: float(np.mean([spearman100(s, g) for s, g in zip(sims, golds, strict=True)]))
              for scale, sims in similarities.items()}
    reference = args.scales[0]
    comparisons = {}
    for scale in args.scales[1:]:
        deltas = mean_difference_bootstrap(golds, similarities[reference], similarities[scale], samples=args.samples)
        low, high = np.percentile(deltas, [2.5, 97.5])
        comparisons[f"x{scale:g} - x{reference:g}"] = {
            "delta": round(scores[scale] - scores[reference], 3), "bootstrap_sd": round(float(deltas.std()), 3),
            "ci95": [round(float(low), 3), round(float(high), 3)]}
    probe_cfg = {"tasks": train_cfg["eval_sts_tasks"], "split": train_cfg["eval_sts_split"],
                 "pairs_each": train_cfg["eval_sts_pairs"], "seed": train_cfg["seed"]}
    result = {"run": str(args.run), "probe": probe_cfg,
              "selected": {"step": train["selected_step"], "scale": train["selected_scale"]}, "bf16": bf16,
              "probe_spearman": {f"x{scale:g}": round(score, 3) for scale, score in scores.items()},
              "differences": comparisons}
    save("probe_noise", result, tag=args.tag)
    for name, row in comparisons.items():
        print(f"{name}: {row['delta']:+.3f} (bootstrap sd {row['bootstrap_sd']:.3f}, 95% CI {row['ci95']})")


if __name__ == "__main__":
    main()
