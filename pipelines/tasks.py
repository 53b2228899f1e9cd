"""Prefect tasks: thin wrappers that add retries, caching, subprocesses and artifacts to ``sempa_train`` stages.

Every stage writes into ``Store.stage_dir(stage, key)`` where ``key`` hashes the stage config and the
content hashes of its inputs. The task's Prefect cache key is that same key, so a re-run with the
same inputs shows the stage as Cached and resumes at the first stage whose output is missing. The
flow passes ``refresh_cache`` when the folder is gone, so a cached result never points at nothing.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext

from sempa_train.assessment import assess
from sempa_train.config import ClusterConfig, PrepareConfig, RankConfig, SampleConfig, TrainConfig
from sempa_train.io import read_manifest
from sempa_train.prepare import prepare
from sempa_train.procs import call_in_subprocess
from sempa_train.ranking import rank
from sempa_train.sampling import sample_candidates, work_dir_for
from sempa_train.train import train_dpo
from sempa_train.workflow import RunConfig


def by_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache key: the content key the flow computed (never a path)."""
    return f"{context.task.name}-{parameters['key']}"


CACHED = {"cache_key_fn": by_key, "persist_result": True}
IO_RETRIES = {"retries": 2, "retry_delay_seconds": 5}  # reading sources and writing datasets can fail transiently


def dataset_artifact(path: Path, title: str) -> None:
    """A table artifact with a dataset's counts and drop reasons (only inside a flow or task run)."""
    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    manifest = read_manifest(path)
    rows = [{"what": k, "count": v} for k, v in manifest.get("counts", {}).items()]
    rows += [{"what": f"dropped: {k}", "count": v} for k, v in manifest.get("drops", {}).items()]
    create_table_artifact(table=rows, key=None, description=f"{title}: {path}")


@task(name="prepare", **CACHED, **IO_RETRIES)
def prepare_task(cfg: PrepareConfig, out: str, key: str) -> str:
    """NLI source → triples + gold preferences."""
    if Path(out).exists():  # complete (stage folders appear atomically): a Prefect cache miss only
        return out
    result = prepare(cfg, Path(out), overwrite=True)
    dataset_artifact(result.triples_dir, "NLI triples")
    return out


@task(name="sample", **CACHED, retries=1, retry_delay_seconds=5)  # a retry resumes at the unfinished shards
def sample_task(cfg: SampleConfig, triples: str, out: str, key: str, cluster: ClusterConfig | None = None) -> str:
    """Paraphrase candidates, with a progress artifact fed from the finished shards: in a subprocess, or with
    the shards spread over a Dask cluster when ``cluster`` is enabled."""
    if Path(out).exists():
        return out
    progress = create_progress_artifact(progress=0.0, description=f"sampling candidates into {out}")
    stop = threading.Event()
    work = work_dir_for(Path(out))
    total = _premise_count(triples, cfg.max_premises)
    shards = max(1, -(-total // cfg.shard_size))

    def watch() -> None:
        while not stop.wait(2.0):
            done = len(list(work.glob("shard-*.parquet"))) if work.is_dir() else 0
            update_progress_artifact(progress, progress=100.0 * done / shards)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        if cluster is not None and cluster.enabled:
            from pipelines.scale import cluster_shard_runner

            sample_candidates(cfg, Path(triples), Path(out), shard_runner=cluster_shard_runner(cluster))
        else:  # finished shards of a failed attempt are reused
            call_in_subprocess(sample_candidates, cfg, Path(triples), Path(out), show_progress=False)
    finally:
        stop.set()
        watcher.join()
    update_progress_artifact(progress, progress=100.0)
    dataset_artifact(Path(out), "candidates")
    return out


def _premise_count(triples: str, limit: int | None) -> int:
    n = int(read_manifest(Path(triples)).get("counts", {}).get("premises_kept", 0))
    return min(n, limit) if limit else n


@task(name="rank", **CACHED, **IO_RETRIES)
def rank_task(cfg: RankConfig, triples: str | None, candidates: str | None, out: str, key: str) -> str:
    """Scored, filtered preference triples (scorer loaded in a subprocess)."""
    if Path(out).exists():
        return out
    call_in_subprocess(rank, cfg, Path(out), triples=Path(triples) if triples else None,
                       candidates=Path(candidates) if candidates else None, overwrite=True)
    dataset_artifact(Path(out), "preference triples")
    return out


@task(name="train", **CACHED)  # no retry: a failed training run is a bug or a resource problem to look at
def train_task(cfg: TrainConfig, data: str, out: str, key: str) -> str:
    """DPO + LoRA in a subprocess (its memory is returned when it ends)."""
    if Path(out).exists():
        return out
    call_in_subprocess(train_dpo, cfg, Path(data), Path(out), overwrite=True)
    return out


@task(name="evaluate")
def evaluate_task(model: str, adapter: str | None, cfg: RunConfig, out: str, inputs: dict[str, str]) -> dict[str, Any]:
    """STS (base and tuned), retention probes, gates and report, in a subprocess; a failed gate fails the task."""
    summary = call_in_subprocess(assess, model, adapter, Path(out), eval_cfg=cfg.eval, embed=cfg.embed,
                                 retention=cfg.retention, gates=cfg.gates, inputs=inputs)
    table = summary["sts"]["table"]
    retention = summary.get("retention", {}).get("compare")
    extra = f"\n\nPerplexity ratio (tuned / base): {retention['perplexity_ratio']:.3f}" if retention else ""
    if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
        create_markdown_artifact(
            key="sts-evaluation", description=f"{model}" + (f" + {adapter}" if adapter else ""),
            markdown=f"## STS evaluation (Spearman x 100)\n\n```\n{table}\n```{extra}\n\n"
                     f"Report: `{Path(out) / 'report.md'}`\n",
        )
    return summary
