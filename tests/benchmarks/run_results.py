"""Collect finished ``sempa run`` folders into one results file: wall time per stage, the selected checkpoint,
STS per task with paired-bootstrap 95 % intervals of the change, retention and gates.

    python tests/benchmarks/run_results.py outputs/runs/quick-seed0 outputs/runs/quick-seed1 --name default-run

Writes ``tests/benchmarks/results/<name>.json`` with the machine this script runs on (run it on the machine
that ran the folders) and prints a markdown table. Reads only what the runs wrote; runs nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common import save

from sempa_train.core.io import read_json
from sempa_train.stages.assessment import Evaluation


def run_row(folder: Path) -> dict[str, Any]:
    summary = read_json(folder / "summary.json")
    evaluation = Evaluation.load(folder / "eval")
    intervals = evaluation.delta_intervals() or {}
    train = summary.get("train") or {}
    return {
        "folder": str(folder),
        "code_version": summary["code_version"],
        "config_seeds": {section: summary["config"][section].get("seed") for section in
                         ("prepare", "sample", "rank", "train")},
        "wall_seconds": summary["wall_seconds"],
        "stage_seconds": {stage: info["seconds"] for stage, info in summary["stages"].items()},
        "selected": {"step": train.get("selected_step"), "scale": train.get("selected_scale")} if train else None,
        "eval_adapter_scale": summary["config"]["eval"].get("adapter_scale", 1.0),
        "pairs": (read_json(folder / "preferences" / "manifest.json").get("rows")
                  if (folder / "preferences" / "manifest.json").is_file() else None),
        "sts_base": evaluation.sts_base,
        "sts": evaluation.sts,
        "sts_delta": {task: evaluation.sts[task] - evaluation.sts_base[task] for task in evaluation.sts},
        "sts_delta_ci95": {task: list(bounds) for task, bounds in intervals.items()},
        **{name: value for name, value in evaluation.metrics().items() if not name.startswith("sts")},
        "gates_passed": evaluation.gates_passed,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | wall | selected | Δ STS-B dev (95% CI) | Δ SICK trial (95% CI) | ppl ratio | paraphrase Δ "
             "| gates |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = []
        for task in ("STSBenchmark", "SICKRelatedness"):
            low, high = row["sts_delta_ci95"].get(task, (float("nan"), float("nan")))
            cells.append(f"{row['sts_delta'][task]:+.2f} [{low:+.2f}, {high:+.2f}]")
        selected = (f"step {row['selected']['step']} x{row['selected']['scale']:g}, then x{row['eval_adapter_scale']:g}"
                    if row["selected"] else f"a given adapter x{row['eval_adapter_scale']:g} (evaluation only)")
        lines.append(f"| {Path(row['folder']).name} | {row['wall_seconds'] / 60:.1f} min | {selected} | {cells[0]} | "
                     f"{cells[1]} | "
                     f"{row.get('perplexity_ratio', float('nan')):.3f} | "
                     f"{row.get('paraphrase_similarity_delta', float('nan')):+.3f} | "
                     f"{'passed' if row['gates_passed'] else 'failed'} |")
    if len(rows) > 1:
        mean = {key: sum(row[key] for row in rows) / len(rows) for key in ("perplexity_ratio",
                                                                           "paraphrase_similarity_delta")}
        deltas = [sum(row["sts_delta"][task] for row in rows) / len(rows) for task in ("STSBenchmark",
                                                                                       "SICKRelatedness")]
        lines.append(f"| mean of {len(rows)} runs | | | {deltas[0]:+.2f} | {deltas[1]:+.2f} | "
                     f"{mean['perplexity_ratio']:.3f} | {mean['paraphrase_similarity_delta']:+.3f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="sempa run output folders")
    parser.add_argument("--name", required=True, help="results file name")
    args = parser.parse_args()
    rows = [run_row(folder) for folder in args.runs]
    save(args.name, {"runs": rows, "table": table(rows)})
    print(table(rows))


if __name__ == "__main__":
    main()
