"""``sempa run``: the whole plan (``sempa_train.plan``) in this process, with a readable output folder.

``OUT`` is a store (stage outputs under ``OUT/stages/<stage>/<key>``, so a second run with the same
``--out`` reuses every finished stage) with links to the outputs of this run::

    OUT/data          prepare: triples/ and the gold preferences/
    OUT/candidates    sample (strategies that sample)
    OUT/preferences   rank: the preference triples trained on
    OUT/model         train: adapter/, train_log.jsonl, metrics.json, manifest.json
    OUT/eval          evaluate: STS base/tuned, retention, gates, report.md + plots
    OUT/summary.json  what ran, where everything is, base vs tuned
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from sempa_train.core.io import code_version, now_iso, read_json, read_manifest, write_json
from sempa_train.core.store import Store
from sempa_train.plan import RunConfig, execute, link_outputs
from sempa_train.stages.sts_data import load_tasks


def run_method(cfg: RunConfig, out_dir: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) every stage of the plan for ``cfg`` under ``out_dir``; return the run summary."""
    out_dir = Path(out_dir)
    if overwrite:
        shutil.rmtree(out_dir, ignore_errors=True)
    started = time.perf_counter()
    # Load the evaluation data first: a missing STS folder should fail before any training.
    load_tasks(cfg.eval.tasks, cfg.eval.split, cfg.eval.senteval_dir)
    run = execute(cfg, Store(out_dir))
    link_outputs(run, out_dir)
    evaluation = read_json(run.artifacts["evaluation"] / "summary.json")
    summary = {
        "created_at": now_iso(),
        "code_version": code_version(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "config": cfg.to_dict(),
        "stages": {stage: {"key": step.key, "reused": run.reused[stage], "seconds": run.seconds[stage]}
                   for stage, step in run.steps.items()},
        "outputs": {"triples": str(out_dir / "data" / "triples"), **evaluation["outputs"],
                    "report": str(out_dir / "eval" / "report.md")},
        "data": {k: read_manifest(run.artifacts["triples"]).get(k, {}) for k in ("counts", "drops")},
        "train": read_json(run.artifacts["model"] / "metrics.json"),
        "sts": evaluation["sts"],
        "retention": evaluation.get("retention"),  # the evaluation's shape: base, tuned, compare
    }
    write_json(out_dir / "summary.json", summary)
    return summary
