"""Prefect tasks: one task per step of the library's stage plan, plus publishing and artifacts.

``run_in_prefect`` is the flow's runner for ``sempa_train.plan.execute``: it submits each step as a task
named after its stage, whose Prefect cache key is the step's content key, so a re-run with the same
inputs shows the stage as Cached and resumes at the first stage whose output is missing (the cache is
refreshed when the folder is gone, so a cached result never points at nothing). Stages that load a
model run in a subprocess, whose memory is returned when it ends; sampling and corpus embedding spread their
shards over the Dask cluster when one is configured and report their progress as an artifact.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext
from prefect.runtime import flow_run

from sempa_train.core.io import read_json, read_manifest
from sempa_train.core.procs import call_in_subprocess
from sempa_train.core.shards import work_dir_for
from sempa_train.core.store import Store
from sempa_train.plan import DATA_STAGES, RunConfig, Step, run_step

SHARDED = ("sample", "embed")  # stages that work in resumable shards (sempa_train.core.shards)


def by_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache key: the content key the plan computed (never a path)."""
    return f"{context.task.name}-{parameters['step'].key}"


@task(cache_key_fn=by_key, persist_result=True)
def stage_task(step: Step) -> str:
    """Run (or reuse) one step of the plan and attach what it produced as artifacts; returns its folder."""
    name = step.stage.name
    if step.done or not step.stage.heavy:
        run_step(step)
    elif name in SHARDED and step.cfg.cluster.enabled:  # shards spread over the Dask cluster
        from pipelines.scale import cluster_shard_runner

        with shard_progress(step):
            run_step(step, shard_runner=cluster_shard_runner(step.cfg.cluster))
    elif name in SHARDED:
        with shard_progress(step):  # finished shards of a failed attempt are reused
            call_in_subprocess(run_step, step, show_progress=False)
    else:
        call_in_subprocess(run_step, step)
    if FlowRunContext.get() is None and TaskRunContext.get() is None:  # called as .fn(): no run to attach to
        return str(step.out)
    for artifact, sub in step.stage.produces.items():
        if name in DATA_STAGES:
            dataset_artifact(step.out / sub if sub else step.out, artifact)
    if name == "evaluate":
        evaluation_artifact(step.out)
    return str(step.out)


def run_in_prefect(step: Step) -> None:
    """The flow's runner: the step as a task named after its stage, with the stage's retries."""
    stage_task.with_options(name=step.stage.name, retries=step.stage.retries, retry_delay_seconds=5,
                            refresh_cache=not step.done)(step)


@task(name="publish")
def publish_task(root: str, dataset: str, parts: dict[str, Path], cfg: RunConfig) -> str:
    """The data stages' outputs as a new immutable version of ``dataset``."""
    version = Store(root).publish(dataset, parts, {
        "config": cfg.to_dict(), "stages": sorted(parts),
        "flow_run": {"id": str(flow_run.get_id()), "name": flow_run.get_name()},
    })
    return str(version)


def published(root: str, dataset: str, cfg: RunConfig) -> Any:
    """An ``after_data`` hook for ``execute``: publish the data artifacts and train on the published copies."""
    def publish(artifacts: Mapping[str, Path]) -> dict[str, Path]:
        parts = {name: artifacts[name] for name in ("triples", "candidates", "preferences") if name in artifacts}
        version = Path(publish_task(root, dataset, parts, cfg))
        return {"dataset_version": version, **{name: version / name for name in parts}}

    return publish


@contextlib.contextmanager
def shard_progress(step: Step) -> Iterator[None]:
    """A progress artifact fed from the finished shards (counted against the work folder's plan.json) while a
    sharded stage (sampling, corpus embedding) runs."""
    progress = create_progress_artifact(progress=0.0, description=f"{step.stage.name}: shards of {step.out}")
    stop = threading.Event()
    work = work_dir_for(step.out)

    def watch() -> None:
        while not stop.wait(2.0):
            plan = work / "plan.json"
            with contextlib.suppress(OSError, ValueError, KeyError):  # not written yet, or being replaced
                shards = max(1, int(read_json(plan)["shards"])) if plan.is_file() else 0
                done = len(list(work.glob("shard-*.parquet")))
                if shards:
                    update_progress_artifact(progress, progress=100.0 * done / shards)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
    update_progress_artifact(progress, progress=100.0)


def dataset_artifact(path: Path, title: str) -> None:
    """A table artifact with a dataset's counts and drop reasons."""
    manifest = read_manifest(path)
    rows = [{"what": k, "count": v} for k, v in manifest.get("counts", {}).items()]
    rows += [{"what": f"dropped: {k}", "count": v} for k, v in manifest.get("drops", {}).items()]
    create_table_artifact(table=rows, key=None, description=f"{title}: {path}")


def evaluation_artifact(eval_dir: Path) -> None:
    """The STS table (and perplexity ratio) of an evaluation as a markdown artifact."""
    summary = read_json(eval_dir / "summary.json")
    retention = summary.get("retention", {}).get("compare")
    extra = f"\n\nPerplexity ratio (tuned / base): {retention['perplexity_ratio']:.3f}" if retention else ""
    create_markdown_artifact(
        key="sts-evaluation", description=summary["model"] + (f" + {summary['adapter']}" if summary["adapter"] else ""),
        markdown=f"## STS evaluation (Spearman x 100)\n\n```\n{summary['sts']['table']}\n```{extra}\n\n"
                 f"Report: `{eval_dir / 'report.md'}`\n",
    )


def outputs_artifact(files: Mapping[str, str]) -> None:
    """Links to a run's outputs (the report and the dataset version also as link artifacts)."""
    lines = [f"- **{k}**: [`{v}`]({Path(v).resolve().as_uri()})" for k, v in files.items()]
    create_markdown_artifact(key="outputs", description="where this run's files are",
                             markdown="## Outputs\n\n" + "\n".join(lines) + "\n")
    for name in ("report", "dataset_version"):
        if name in files:
            create_link_artifact(link=Path(files[name]).resolve().as_uri(), link_text=name.replace("_", " "))
