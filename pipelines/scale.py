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
from pathlib import Path
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
    if cluster.address:  # ClusterConfig refused a plain non-loopback address unless insecure was set
        security = cluster.security
        return DaskTaskRunner(address=cluster.address, **({"client_kwargs": {"security": security}}
                                                          if security is not None else {}))
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


def make_lab_certificates(folder: Path | str, hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                          days: int = 365) -> dict[str, Path]:
    """A private CA and one certificate signed by it (for the scheduler, the workers and the clients of a lab
    cluster), written to ``folder`` as PEM files (keys readable by the owner only). Returns their paths:
    ``ca`` (give it to every node as the trusted CA), ``cert`` and ``key`` (the node and client identity).
    Hand the key only to machines that may run code on the cluster."""
    import datetime
    import ipaddress
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sempa lab cluster CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sempa lab cluster node")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.pem", "cert": folder / "node.pem", "key": folder / "node-key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["key"], "wb", opener=lambda path, flags: os.open(path, flags, 0o600)) as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return paths
