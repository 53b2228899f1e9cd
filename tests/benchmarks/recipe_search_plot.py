r"""Every full-budget run of the recipe search on one plot: Δ STS-B dev against the perplexity ratio, one colour
per arm, one point per seed (labelled with its data seed), the 95 % interval as a bar, the issue's target region
shaded, and a filled marker where a run meets all four conditions (a hollow one where it misses any).

    python tests/benchmarks/recipe_search_plot.py --name recipe-search \
        --arm "beta 0.1 (the old recipe)" margin-selection-seeds recipe-seed-3 recipe-seed-4 \
        --arm "beta 0.25 (the recipe)" beta-0.25-seeds beta-0.25-seeds-3-4 \
        --arm "own share 0.35" hybrid-fraction-seed2:gold65-seed2

Each ``--arm`` is a label and the results files (names under ``tests/benchmarks/results/``, without ``.json``) whose
runs belong to it, as ``seed_sequence.py`` and ``run_results.py`` write them; ``FILE:FOLDER`` takes only the run whose
folder name is ``FOLDER`` (for files that hold several arms). Runs no model. Writes ``results/<name>.json`` (one
row per run with its arm, seed and the conditions it misses) and ``results/<name>-pareto.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import RESULTS, save
from seed_sequence import TARGETS, misses

from sempa_train.stages.report import agg_pyplot

TASK = "STSBenchmark"


def arm_runs(label: str, refs: list[str]) -> list[dict[str, Any]]:
    """The run rows named by ``refs`` (``FILE`` or ``FILE:FOLDER``), each with its arm, seed and misses."""
    rows = []
    for ref in refs:
        name, _, folder = ref.partition(":")
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"--arm {label!r}: no results file {path}")
        try:
            runs = json.loads(path.read_text()).get("runs")
        except json.JSONDecodeError as error:
            raise SystemExit(f"--arm {label!r}: {path} is not valid JSON ({error})") from error
        if not isinstance(runs, list):
            raise SystemExit(f"--arm {label!r}: {path} has no 'runs' list (not a seed_sequence.py/run_results.py file)")
        if folder:
            runs = [r for r in runs if Path(r["folder"]).name == folder]
            if not runs:
                raise SystemExit(f"--arm {label!r}: {path} has no run in a folder named {folder!r}")
        for run in runs:
            lacking = [key for key in ("folder", "config_seeds", "sts_delta", "sts_delta_ci95", "perplexity_ratio",
                                       "paraphrase_similarity_delta") if key not in run]
            if lacking:
                raise SystemExit(f"--arm {label!r}: a run in {path} lacks {', '.join(lacking)}")
            seeds = run["config_seeds"]
            rows.append({"arm": label, "source": ref, "folder": run["folder"], "seed": seeds["prepare"],
                         "training_seed": seeds["train"],
                         "sts_b_delta": run["sts_delta"][TASK], "sts_b_ci95": run["sts_delta_ci95"][TASK],
                         "sick_delta": run["sts_delta"]["SICKRelatedness"],
                         "perplexity_ratio": run["perplexity_ratio"],
                         "paraphrase_similarity_delta": run["paraphrase_similarity_delta"], "misses": misses(run)})
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """The Pareto view of ``rows``: target region shaded, a filled marker where all four conditions are met."""
    plt = agg_pyplot()
    ratios = [r["perplexity_ratio"] for r in rows]
    left, right = min(0.88, min(ratios) - 0.01), max(1.08, max(ratios) + 0.01)
    top = max(4.8, max(r["sts_b_ci95"][1] for r in rows) + 0.1)
    fig, ax = plt.subplots(figsize=(10, 5.5))
    ax.fill_between([left, TARGETS["max_perplexity_ratio"]], TARGETS["min_sts_b_delta"], top, color="tab:green",
                    alpha=0.08, label=f"target: Δ STS-B ≥ {TARGETS['min_sts_b_delta']:+.1f}, "
                                      f"ppl ratio ≤ {TARGETS['max_perplexity_ratio']}")
    ax.axvline(TARGETS["max_perplexity_ratio"], color="tab:red", ls="--", lw=0.8)
    ax.axhline(TARGETS["min_sts_b_delta"], color="tab:green", ls="--", lw=0.8)
    colours, markers = plt.get_cmap("tab10").colors, "osD^v"
    for i, arm in enumerate(dict.fromkeys(r["arm"] for r in rows)):
        colour, marker = colours[i % len(colours)], markers[(i // len(colours)) % len(markers)]
        for j, r in enumerate(r for r in rows if r["arm"] == arm):
            x, y = r["perplexity_ratio"], r["sts_b_delta"]
            ax.plot([x, x], r["sts_b_ci95"], color=colour, lw=0.7, alpha=0.6)
            fill = [colour] if not r["misses"] else "none"
            ax.scatter([x], [y], s=36, marker=marker, edgecolors=[colour], facecolors=fill, linewidths=1.4,
                       label=arm if j == 0 else None, zorder=3)
            ax.annotate(str(r["seed"]), (x, y), fontsize=7, xytext=(4, -3), textcoords="offset points")
    ax.set_xlim(left, right)
    ax.set_xlabel("perplexity ratio on held-out text (tuned / base)")
    ax.set_ylabel("Δ STS-B dev Spearman x 100 (95 % interval)")
    ax.set_title("SmolLM2-135M recipe search: every full-budget run (number = seed; filled = all four met)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", nargs="+", action="append", required=True, metavar="LABEL FILE",
                        help="an arm's label, then its results files (FILE or FILE:FOLDER)")
    parser.add_argument("--name", required=True, help="results file name")
    args = parser.parse_args()
    rows = []
    for label, *refs in args.arm:
        if not refs:
            parser.error(f"--arm {label!r} names no results file")
        rows += arm_runs(label, refs)
    plot(rows, RESULTS / f"{args.name}-pareto.png")
    lines = ["| arm | seed | Δ STS-B dev (95% CI) | Δ SICK trial | ppl ratio | paraphrase Δ | all four |",
             "|---|---:|---|---:|---:|---:|---|"]
    for r in rows:
        low, high = r["sts_b_ci95"]
        seed = str(r["seed"]) if r["training_seed"] == r["seed"] else \
            f"{r['seed']} (training seed {r['training_seed']})"
        lines.append(f"| {r['arm']} | {seed} | {r['sts_b_delta']:+.2f} [{low:+.2f}, {high:+.2f}] | "
                     f"{r['sick_delta']:+.2f} | {r['perplexity_ratio']:.3f} | {r['paraphrase_similarity_delta']:+.3f} "
                     f"| {'met' if not r['misses'] else 'missed'} |")
    table = "\n".join(lines)
    save(args.name, {"arms": {label: refs for label, *refs in args.arm}, "targets": TARGETS, "runs": rows,
                     "table": table, "plot": f"tests/benchmarks/results/{args.name}-pareto.png"})
    print(table)


if __name__ == "__main__":
    main()
