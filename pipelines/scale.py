"""Shards (sampling, corpus embedding) in parallel on a Dask cluster, through Prefect's ``DaskTaskRunner``.

Each pending shard becomes one Prefect task run on a Dask worker. A worker process builds its
sampler (one vLLM engine, or one transformers model) or encoder once and reuses it for every shard it gets.
Shards are written atomically under their final names, so a shard redone after a worker died, or run
twice, leaves exactly one file; the scheduler moves the work of a dead worker to the live ones and
the task retries. ``ClusterConfig`` says where to run: ``address`` of a running scheduler or
``local_workers`` for a local cluster on 127.0.0.1, and the ``resources`` each shard job needs.

Workers that run vLLM must be allowed to start processes: start them with
``DASK_DISTRIBUTED__WORKER__DAEMON=False`` (the local cluster here sets it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import dask
from prefect import flow, task
from prefect_dask import DaskTaskRunner

from sempa_train.core.config import ClusterConfig
from sempa_train.core.shards import ShardRunner


@task(name="shard", retries=3, retry_delay_seconds=2)
def shard_task(one_shard: Callable[[int], Any], index: int) -> Any:
    return one_shard(index)


@flow(name="sempa-shards")
def run_shards_on_cluster(one_shard: Callable[[int], Any], pending: Sequence[int],
                          resources: dict[str, float]) -> list[Any]:
    """Submit every pending shard and wait for all of them."""
    annotate = dask.annotate(resources=resources) if resources else contextlib.nullcontext()
    with annotate:
        futures = [shard_task.submit(one_shard, index) for index in pending]
    return [future.result() for future in futures]


def dask_task_runner(cluster: ClusterConfig) -> DaskTaskRunner:
    """A runner on the configured scheduler, or on a new local cluster of worker processes on 127.0.0.1."""
    if cluster.address:
        return DaskTaskRunner(address=cluster.address)
    dask.config.set({"distributed.worker.daemon": False})  # workers may start processes (vLLM engines)
    resources = cluster.resource_map()
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": cluster.local_workers, "threads_per_worker": cluster.threads_per_worker, "processes": True,
        "host": "127.0.0.1", "dashboard_address": None, **({"resources": resources} if resources else {}),
    })


def cluster_shard_runner(cluster: ClusterConfig) -> ShardRunner:
    """A ``shard_runner`` (``sempa_train.core.shards``) for sampling or corpus embedding that uses the cluster."""

    def run(one_shard: Callable[[int], Any], pending: Sequence[int]) -> None:
        run_shards_on_cluster.with_options(task_runner=dask_task_runner(cluster))(one_shard, list(pending),
                                                                                  cluster.resource_map())

    return run
