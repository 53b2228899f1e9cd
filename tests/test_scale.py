"""Scale-out: the sample stage on a local Dask cluster (127.0.0.1, two worker processes) through Prefect's
DaskTaskRunner, with one worker killed in the middle."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import polars as pl
import pytest
from test_pipelines import prefect_harness  # noqa: F401 - module-scoped Prefect test server
from test_sampling import cfg_for, tiny_triples  # noqa: F401 - fixtures

from sempa_train.core.config import ClusterConfig
from sempa_train.stages.sampling import sample_candidates, work_dir_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dask_cluster(tmp_path):
    """A scheduler and two single-threaded worker processes without nannies (a killed worker stays dead)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--dashboard-address", ":0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    time.sleep(2)
    for name in ("w1", "w2"):
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--name", name,
                                       "--nthreads", "1", "--no-nanny", "--dashboard-address", ":0"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=60)
    try:
        yield address, procs[1:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_sample_on_dask_survives_a_dead_worker(prefect_harness, dask_cluster, tiny_model_dir,  # noqa: F811
                                                tiny_triples, tmp_path):  # noqa: F811
    from pipelines.scale import cluster_shard_runner

    address, workers = dask_cluster
    cfg = cfg_for(tiny_model_dir, max_premises=24, shard_size=3, max_tokens=48, batch_size=1)
    out = tmp_path / "cand"
    work = work_dir_for(out)
    killed: list[int] = []

    def kill_one_worker() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not list(work.glob("shard-*.parquet")):
            time.sleep(0.02)
        workers[0].kill()  # SIGKILL: no goodbye to the scheduler
        killed.append(len(list(work.glob("shard-*.parquet"))))

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    runner = cluster_shard_runner(ClusterConfig(address=address))
    result = sample_candidates(cfg, tiny_triples, out, shard_runner=runner)
    killer.join()
    assert workers[0].poll() is not None and killed and killed[0] < 8, "a worker should die mid-run"

    table = pl.read_parquet(result.out_dir / "data.parquet")
    single = pl.read_parquet(sample_candidates(cfg, tiny_triples, tmp_path / "single", show_progress=False).out_dir
                             / "data.parquet")
    assert result.counts["shards"] == 8
    assert table["premise_id"].to_list() == single["premise_id"].to_list()
    assert table.select("premise_id", "candidate_idx").equals(single.select("premise_id", "candidate_idx"))


def test_sample_on_a_tls_cluster_with_lab_certificates(prefect_harness, tiny_model_dir, tiny_triples,  # noqa: F811
                                                         tmp_path):
    """A scheduler that requires TLS, certificates from make_lab_certificates: the tiny sampling runs with them,
    and a client without them is turned away."""
    from distributed import Client, LocalCluster, Security

    from pipelines.scale import cluster_shard_runner, make_lab_certificates

    certs = make_lab_certificates(tmp_path / "certs")
    assert oct(certs["key"].stat().st_mode & 0o777) == "0o600"
    node = {"tls_ca_file": str(certs["ca"]), "tls_scheduler_cert": str(certs["cert"]),
            "tls_scheduler_key": str(certs["key"]), "tls_worker_cert": str(certs["cert"]),
            "tls_worker_key": str(certs["key"]), "tls_client_cert": str(certs["cert"]),
            "tls_client_key": str(certs["key"])}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls://", host="127.0.0.1",
                      dashboard_address=None, security=Security(**node, require_encryption=True)) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://")
        cluster_cfg = ClusterConfig(address=address, tls_ca_file=str(certs["ca"]), tls_cert=str(certs["cert"]),
                                    tls_key=str(certs["key"]))
        cfg = cfg_for(tiny_model_dir, max_premises=6, shard_size=3, max_tokens=12)
        result = sample_candidates(cfg, tiny_triples, tmp_path / "cand", shard_runner=cluster_shard_runner(cluster_cfg))
        assert result.counts["shards"] == 2 and result.counts["candidates"] == 18
        with pytest.raises(Exception):  # noqa: B017, PT011 - refused at the TLS handshake, or times out
            Client(address.replace("tls://", "tcp://"), timeout=3)


def test_embed_shards_on_a_local_dask_cluster(prefect_harness, tiny_model_dir, tmp_path):  # noqa: F811
    """The embed stage's shards run on Dask worker processes (the job is pickled, each worker builds its encoder
    once) and give the table a single process writes."""
    import numpy as np
    from distributed import LocalCluster

    from pipelines.scale import cluster_shard_runner
    from sempa_train.core.config import CorpusConfig, EmbedConfig
    from sempa_train.stages.corpus import embed_corpus

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Sentence number {i} is about a dog in a park." for i in range(30)) + "\n")
    kwargs = {"model": str(tiny_model_dir), "embed": EmbedConfig(dtype="float32", batch_size=8),
              "corpus": CorpusConfig(shard_size=10), "show_progress": False}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        runner = cluster_shard_runner(ClusterConfig(address=cluster.scheduler_address))
        on_dask = embed_corpus(corpus, tmp_path / "dask", shard_runner=runner, **kwargs)
    single = embed_corpus(corpus, tmp_path / "single", **kwargs)
    assert on_dask.counts["shards"] == 3
    a, b = (pl.read_parquet(r.out_dir / "data.parquet") for r in (on_dask, single))
    assert a["id"].to_list() == b["id"].to_list()
    np.testing.assert_allclose(a["vector"].to_numpy(), b["vector"].to_numpy(), atol=1e-5)
