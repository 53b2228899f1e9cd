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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sempa_train.core.io import code_version, now_iso, read_json, read_manifest, write_json
from sempa_train.core.store import Store
from sempa_train.plan import STAGE_NAMES, RunConfig, execute, link_outputs
from sempa_train.stages.sts_data import load_tasks


def run_method(cfg: RunConfig, out_dir: Path, *, overwrite: bool = False, stages: Sequence[str] = STAGE_NAMES,
               given: Mapping[str, Path] | None = None) -> dict[str, Any]:
    """Run (or resume) the plan's ``stages`` for ``cfg`` under ``out_dir`` (``given`` artifacts stand in for the
    stages not run, e.g. an adapter to evaluate); return the run summary."""
    out_dir = Path(out_dir)
    if overwrite:
        shutil.rmtree(out_dir, ignore_errors=True)
    started = time.perf_counter()
    # Load the evaluation data first: a missing STS folder should fail before any training.
    load_tasks(cfg.eval.tasks, cfg.eval.split, cfg.eval.senteval_dir)
    run = execute(cfg, Store(out_dir), stages=stages, given=given)
    link_outputs(run, out_dir)
    artifacts = run.artifacts
    evaluation = read_json(artifacts["evaluation"] / "summary.json") if "evaluation" in artifacts else {}
    summary = {
        "created_at": now_iso(),
        "code_version": code_version(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "config": cfg.to_dict(),
        "stages": {stage: {"key": step.key, "reused": run.reused[stage], "seconds": run.seconds[stage]}
                   for stage, step in run.steps.items()},
        "outputs": {**({"triples": str(out_dir / "data" / "triples")} if "triples" in artifacts else {}),
                    **evaluation.get("outputs", {}),
                    **({"report": str(out_dir / "eval" / "report.md")} if evaluation else {})},
        "data": {k: read_manifest(artifacts["triples"]).get(k, {}) for k in ("counts", "drops")}
        if "triples" in artifacts else None,
        "train": read_json(artifacts["model"] / "metrics.json") if "model" in artifacts else None,
        "sts": evaluation.get("sts"),
        "retention": evaluation.get("retention"),  # the evaluation's shape: base, tuned, compare
    }
    write_json(out_dir / "summary.json", summary)
    return summary
