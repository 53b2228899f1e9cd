"""The product as users run it: a fresh Prefect server on 127.0.0.1, flows.yaml deployed, a worker,
and `prefect deployment run sempa/full` on a tiny-model parameter set, waited on until Completed."""

from __future__ import annotations

import json
import socket

import polars as pl
import pytest
from conftest import SAMPLE_NLI
from test_sts import make_senteval


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_prefect(tmp_path, monkeypatch):
    from pipelines.local import LocalPrefect

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    local = LocalPrefect(port=free_port(), state_dir=tmp_path / "prefect-state")
    try:
        yield local
    finally:
        local.down()
        assert not local.healthy()


def test_deployment_run_full_completes(local_prefect, tiny_model_dir, tmp_path):
    local_prefect.up()
    status = local_prefect.status()
    assert status["server_healthy"] and status["worker_running"]
    deployments = local_prefect.prefect("deployment", "ls").stdout
    assert "sempa/full" in deployments and "sempa/refresh" in deployments and "sempa/evaluate" in deployments
    assert "sempa-experiment/sweep" in deployments

    root = tmp_path / "store"
    params = {
        "config": None,  # not the deployment's default recipe (real SmolLM2 on the shared data): a tiny plan
        "model": str(tiny_model_dir),
        "prepare": {"source": str(SAMPLE_NLI), "max_premises": 8},
        "sample": {"backend": "transformers", "n": 2, "max_tokens": 12, "shard_size": 4, "dtype": "float32"},
        "rank": {"strategy": "sampled", "min_length_ratio": 0.0, "max_length_ratio": 100.0,
                 "drop_truncated": False},
        "train": {"max_steps": 1, "batch_size": 2},
        "eval": {"senteval_dir": str(make_senteval(tmp_path / "senteval")), "tasks": ["STSBenchmark"],
                 "split": "dev"},
        "embed": {"dtype": "float32"},
        "retention": {"max_texts": 8, "paraphrases": 2},
        "root": str(root),
    }
    assert local_prefect.run_deployment("full", params, timeout=900) == 0  # --watch exits 0 on Completed

    version = root / "datasets" / "default" / "v0001"
    prefs = pl.read_parquet(version / "preferences" / "data.parquet")
    assert prefs.height > 0 and {"prompt", "chosen", "rejected"} <= set(prefs.columns)
    [summary] = list((root / "stages" / "evaluate").glob("*/summary.json"))
    results = json.loads(summary.read_text())
    assert results["sts"]["tuned"] is not None and results["gates"]["passed"]
    tuned = json.loads((summary.parent / "tuned.json").read_text())
    assert "STSBenchmark" in tuned["tasks"] and tuned["adapter"].endswith("adapter")
    assert (summary.parent / "report.md").is_file()


def test_unreachable_server_says_how_to_start_it(tmp_path):
    from pipelines.local import LocalPrefect, PrefectUnavailableError

    local = LocalPrefect(port=free_port(), state_dir=tmp_path)
    with pytest.raises(PrefectUnavailableError, match="sempa prefect up"):
        local.run_deployment("full")


def test_a_server_with_an_auth_string_rejects_clients_without_it(tmp_path, monkeypatch):
    import base64
    import urllib.error
    import urllib.request

    from pipelines.local import LocalPrefect, PrefectUnavailableError

    secret = tmp_path / "auth"
    secret.write_text("sempa:correct-horse\n")
    with pytest.raises(PrefectUnavailableError, match="without authentication"):
        LocalPrefect(host="0.0.0.0", state_dir=tmp_path)
    (tmp_path / "bad").write_text("no-colon")
    with pytest.raises(PrefectUnavailableError, match="user:password"):
        LocalPrefect(auth_string_file=tmp_path / "bad", state_dir=tmp_path)

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    local = LocalPrefect(port=free_port(), state_dir=tmp_path / "state", auth_string_file=secret)
    try:
        local.start_server()

        def post(headers: dict[str, str]) -> int:
            request = urllib.request.Request(f"{local.api_url}/flows/filter", data=b"{}", method="POST",
                                             headers={"Content-Type": "application/json", **headers})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as e:
                return e.code

        assert post({}) == 401
        wrong = base64.b64encode(b"sempa:wrong").decode()
        assert post({"Authorization": f"Basic {wrong}"}) == 401
        right = base64.b64encode(b"sempa:correct-horse").decode()
        assert post({"Authorization": f"Basic {right}"}) == 200
        assert local.prefect("work-pool", "ls").returncode == 0  # the CLI clients get the auth string
    finally:
        local.down()
