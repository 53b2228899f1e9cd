"""Sampling wall time on a local Dask cluster with 1 and with 2 worker processes (same premises, same settings).

    python tests/benchmarks/scale_out.py --nli ../shared/data/nli/snli/validation.jsonl --premises 32

SmolLM2-135M-Instruct with the transformers backend (one model per worker process, reused for all
its shards), n=4 candidates of up to 64 tokens per premise, shards of 8 premises, one torch thread
per worker; the same premises each time, through the ``DaskTaskRunner`` path of the flow. On a
2-core machine two workers can at best halve the time. ``--workers 0`` times the default
single-process path instead (no cluster, no Prefect; on a GPU machine it samples on the GPU):

    python tests/benchmarks/scale_out.py --workers 0 --tag h100

Writes ``tests/benchmarks/results/scale_out[-<tag>].json``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker process (inherited by the workers)

from common import prefect_server, save  # noqa: E402

from sempa_train.core.config import ClusterConfig, PrepareConfig, SampleConfig  # noqa: E402
from sempa_train.stages.prepare import prepare  # noqa: E402
from sempa_train.stages.sampling import sample_candidates  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nli", default="../shared/data/nli/snli/validation.jsonl")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--premises", type=int, default=32)
    parser.add_argument("--workers", default="1,2",
                        help="comma-separated Dask worker counts; 0: the single-process path, no cluster")
    parser.add_argument("--tag", default="", help="suffix of the result file (e.g. h100)")
    args = parser.parse_args()
    if {int(w) for w in args.workers.split(",")} == {0}:
        compare(args)
        return

    with prefect_server():
        compare(args)


def compare(args: argparse.Namespace) -> None:
    cfg = SampleConfig(model=args.model, backend="transformers", n=4, max_tokens=64, shard_size=8,
                       max_premises=args.premises, batch_size=8)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        triples = prepare(PrepareConfig(source=args.nli, max_premises=args.premises), Path(tmp) / "prep").triples_dir
        for workers in (int(w) for w in args.workers.split(",")):
            start = time.perf_counter()
            runner = None
            if workers:
                from pipelines.scale import cluster_shard_runner  # Prefect and Dask: only when a cluster is timed

                runner = cluster_shard_runner(ClusterConfig(local_workers=workers))
            result = sample_candidates(cfg, triples, Path(tmp) / f"cand-{workers}", shard_runner=runner)
            seconds = time.perf_counter() - start
            results[str(workers)] = {"seconds": round(seconds, 1), "candidates": result.counts["candidates"],
                                     "candidates_per_second": round(result.counts["candidates"] / seconds, 2)}
            print(f"{workers} worker(s): {seconds:.1f}s", flush=True)
    if {"1", "2"} <= set(results):
        results["speedup_2_over_1"] = round(results["1"]["seconds"] / results["2"]["seconds"], 2)
    out = {"model": args.model, "premises": args.premises, "settings": {"n": 4, "max_tokens": 64, "shard_size": 8,
                                                                         "threads_per_worker": 1},
           "results": results}
    save("scale_out", out, tag=args.tag)


if __name__ == "__main__":
    main()
