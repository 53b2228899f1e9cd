"""The Prefect flow in-process (one session-scoped test server), and the task logic through ``.fn()``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import SAMPLE_NLI
from test_sts import make_senteval

from sempa_train.core.io import file_sha256
from sempa_train.stages.model_card import card_metadata

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.settings import (
        PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120), temporary_settings(
        {PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED: False}
    ):
        yield


def tiny_params(tiny_model_dir: Path, senteval: Path, root: Path, **train) -> dict:
    return {
        "model": str(tiny_model_dir),
        "prepare": {"source": str(SAMPLE_NLI), "max_premises": 12},
        "sample": {"backend": "transformers", "n": 2, "max_tokens": 16, "shard_size": 6, "dtype": "float32"},
        "rank": {"strategy": "sampled", "min_length_ratio": 0.0, "max_length_ratio": 100.0, "drop_truncated": False},
        "train": {"max_steps": 1, "batch_size": 2, **train},
        "eval": {"senteval_dir": str(senteval), "tasks": ["STSBenchmark"], "split": "dev"},
        "embed": {"dtype": "float32"},
        "retention": {"max_texts": 8, "paraphrases": 3},
        "root": str(root),
        "dataset": "tiny",
    }


def task_runs(flow_run_id) -> list[tuple[str, str]]:
    """``(task name, state)`` of every task run of a flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [(run.name.rsplit("-", 1)[0], run.state.name) for run in runs]


def task_states(flow_run_id) -> dict[str, str]:
    return dict(task_runs(flow_run_id))


def flow_process(params: dict) -> subprocess.Popen:
    """The ``sempa`` flow in a process of its own (a worker), on the test server, in its own process group."""
    from prefect.settings import get_current_settings

    code = "import json, sys\nfrom pipelines.flows import sempa\nsempa(**json.loads(sys.argv[1]))"
    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url)}
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(params)], env=env, cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_worker_killed_in_train_then_rerun_resumes_from_cache(prefect_harness, tiny_model_dir, tmp_path):
    """Fault injection: the flow's process (and its stage subprocess) SIGKILLed while training; the deployment run
    again takes prepare, sample and rank from the cache, trains from the start and publishes nothing twice."""
    from pipelines.flows import sempa
    from sempa_train.core.store import Store

    senteval = make_senteval(tmp_path / "senteval")
    root = tmp_path / "store"
    params = tiny_params(tiny_model_dir, senteval, root)
    worker = flow_process(params)
    train_dir, deadline = root / "stages" / "train", time.monotonic() + 300
    while not list(train_dir.glob(".*.partial")):  # training has started
        assert worker.poll() is None, f"the flow ended before training: {worker.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "training did not start within 300 s"
        time.sleep(0.02)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    store = Store(root)
    assert store.versions("tiny") == ["v0001"]  # published before training
    assert not [p for p in train_dir.iterdir() if not p.name.startswith(".")]  # no folder that looks trained

    state = sempa(**params, return_state=True)
    assert state.is_completed(), state
    second = task_states(state.state_details.flow_run_id)
    assert second["prepare"] == "Cached" and second["sample"] == "Cached" and second["rank"] == "Cached"
    assert second["train"] == "Completed" and second["evaluate"] == "Completed"
    assert store.versions("tiny") == ["v0001"]  # the same data is not published twice
    assert not list(train_dir.glob(".*.partial"))  # the killed attempt's scratch folder is gone

    outputs = state.result()
    prefs = pl.read_parquet(Path(outputs["preferences"]) / "data.parquet")
    assert prefs.height > 0 and set(prefs["chosen_origin"]) == {"sampled"}
    assert Path(outputs["dataset_version"]).parent.name == "tiny"
    model_manifest = json.loads((Path(outputs["model_dir"]) / "manifest.json").read_text())
    assert model_manifest["data"] == outputs["preferences"]  # the model names its data version
    summary = json.loads((Path(outputs["eval_dir"]) / "summary.json").read_text())
    assert summary["sts"]["delta"] == pytest.approx(summary["sts"]["tuned"] - summary["sts"]["base"])
    assert summary["retention"]["compare"]["perplexity_ratio"] > 0
    for name in ("report.md", "sts_bars.png", "stsb_scatter.png", "training.png", "scores.png"):
        assert (Path(outputs["eval_dir"]) / name).is_file(), name

    # the evaluated adapter is kept with a model card that carries the summary's numbers
    shipped = Path(outputs["eval_dir"]) / "adapter"
    card = (shipped / "README.md").read_text()
    assert card_metadata(card)["library_name"] == "peft"
    tuned = json.loads((Path(outputs["eval_dir"]) / "tuned.json").read_text())["tasks"]["STSBenchmark"]["spearman"]
    assert f"| {tuned:.2f} |" in card and f"{summary['retention']['compare']['perplexity_ratio']:.3f}" in card
    split = json.loads((Path(outputs["eval_dir"]) / "base.json").read_text())["eval_config"]["split"]
    assert f"Split: {split} (" in card
    assert model_manifest["data_sha256"] in (Path(outputs["model_dir"]) / "adapter" / "README.md").read_text()

    # the embed deployment: a corpus embedded with that adapter, on the same store
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A man plays a guitar.\nA woman reads a book.\nA man plays a guitar.\n")
    state = sempa(stages=["embed"], source=str(corpus), adapter=str(shipped), model=str(tiny_model_dir),
                  embed={"dtype": "float32"}, root=str(root), return_state=True)
    assert state.is_completed(), state
    embeddings = Path(state.result()["embeddings"])
    manifest = json.loads((embeddings / "manifest.json").read_text())
    assert manifest["rows"] == 2 and manifest["config"]["adapter_sha256"] == file_sha256(
        shipped / "adapter_model.safetensors")


def test_two_refresh_runs_at_once_publish_two_complete_versions(prefect_harness, tiny_model_dir, tmp_path):
    """The refresh deployment's parameters in two worker processes at once: each run draws its own seed, and the
    store gets two distinct, complete versions."""
    from sempa_train.core.store import Store, dataset_hash

    params = tiny_params(tiny_model_dir, tmp_path, tmp_path / "store")
    params.pop("eval")
    workers = [flow_process({**params, "stages": ["prepare", "sample", "rank"], "seed": "per-run"}) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-2000:]
    store = Store(tmp_path / "store")
    assert store.versions("tiny") == ["v0001", "v0002"]
    manifests = [json.loads((store.dataset_dir("tiny") / v / "manifest.json").read_text()) for v in ("v0001", "v0002")]
    assert len({m["config"]["sample"]["seed"] for m in manifests}) == 2
    assert all(m["config"]["prepare"]["seed"] == m["config"]["sample"]["seed"] for m in manifests)
    for manifest in manifests:
        assert set(manifest["parts"]) == {"triples", "candidates", "preferences"}
        for part, entry in manifest["parts"].items():  # complete: every part matches the hash it was published with
            assert dataset_hash(store.dataset_dir("tiny") / manifest["version"] / part) == entry["data_sha256"]
    assert manifests[0]["parts"]["candidates"]["data_sha256"] != manifests[1]["parts"]["candidates"]["data_sha256"]
    assert store.latest("tiny").name == "v0002"


def test_bad_parameters_fail_before_any_stage(prefect_harness, tmp_path):
    from pipelines.flows import sempa

    state = sempa(rank={"strategy": "best"}, root=str(tmp_path), return_state=True)
    assert state.is_failed() and "strategy must be one of gold, sampled, hybrid, got 'best'" in str(
        state.result(raise_on_failure=False))
    assert not (tmp_path / "stages").exists()
    state = sempa(dataset="../elsewhere", root=str(tmp_path), return_state=True)
    assert state.is_failed() and "dataset name must be" in str(state.result(raise_on_failure=False))
    assert not (tmp_path / "stages").exists()


def test_paths_outside_the_allowed_folders_are_refused_before_any_stage(prefect_harness, tmp_path, monkeypatch):
    from pipelines.flows import sempa

    monkeypatch.setenv("SEMPA_ALLOWED_PATHS", str(tmp_path / "mine"))
    for params in ({"root": "/etc/sempa"}, {"root": str(tmp_path / "mine"), "prepare": {"source": "/etc/passwd"}},
                   {"root": str(tmp_path / "mine"), "stages": ["embed"], "source": str(tmp_path / "other.txt")}):
        state = sempa(**params, return_state=True)
        assert state.is_failed() and "lies outside the folders this worker may use" in str(
            state.result(raise_on_failure=False)), params
    assert not (tmp_path / "mine").exists()


def test_task_logic_through_fn(prefect_harness, tmp_path):
    from pipelines.tasks import stage_task
    from sempa_train.core.config import PrepareConfig
    from sempa_train.plan import RunConfig, Step, stage

    out = tmp_path / "prep"
    step = Step(stage("prepare"), RunConfig(prepare=PrepareConfig(source=str(SAMPLE_NLI))), {}, out, "k")
    assert stage_task.fn(step) == str(out)
    assert pl.read_parquet(out / "preferences" / "data.parquet").height == 64
    mtime = (out / "triples" / "data.parquet").stat().st_mtime_ns
    stage_task.fn(step)  # complete output: reused
    assert (out / "triples" / "data.parquet").stat().st_mtime_ns == mtime


def test_the_three_runners_produce_the_same_datasets_and_adapter(prefect_harness, tiny_model_dir, tmp_path):
    """``sempa run``, the Prefect flow and an experiment arm run one plan: equal data hashes, equal adapters."""
    import yaml
    from safetensors.torch import load_file

    from pipelines.flows import sempa
    from sempa_train.experiment import run_experiment
    from sempa_train.plan import RunConfig
    from sempa_train.workflow import run_method

    senteval = make_senteval(tmp_path / "senteval")
    params = tiny_params(tiny_model_dir, senteval, tmp_path / "flow", max_steps=3, learning_rate=0.05)
    sections = {k: v for k, v in params.items() if k not in ("model", "root", "dataset")}

    flow_out = sempa(**params)
    flow = {"version": Path(flow_out["dataset_version"]), "adapter": Path(flow_out["model_dir"]) / "adapter"}
    run_method(RunConfig.build(overrides=sections, model=params["model"]), tmp_path / "run")
    run = {"version": tmp_path / "run", "adapter": tmp_path / "run" / "model" / "adapter"}
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"out": str(tmp_path / "exp"), "model": params["model"], **sections,
                                      "strategies": {"arm": {}}}))
    run_experiment(config)
    arm = {"version": tmp_path / "exp" / "arm", "adapter": tmp_path / "exp" / "arm" / "model" / "adapter"}

    def data_hashes(parts: dict[str, Path]) -> dict[str, str]:
        triples = parts["version"] / ("triples" if parts is flow else "data/triples")
        return {name: json.loads((path / "manifest.json").read_text())["data_sha256"] for name, path in
                (("triples", triples), ("candidates", parts["version"] / "candidates"),
                 ("preferences", parts["version"] / "preferences"))}

    assert data_hashes(flow) == data_hashes(run) == data_hashes(arm)
    weights = [load_file(parts["adapter"] / "adapter_model.safetensors") for parts in (flow, run, arm)]
    assert any(float(w.abs().max()) > 0 for name, w in weights[0].items() if "lora_B" in name)  # it trained
    for other in weights[1:]:
        assert other.keys() == weights[0].keys()
        for name, w in weights[0].items():
            assert float((other[name] - w).abs().max()) <= 1e-6, name


def test_experiment_flow_runs_a_sweep_with_a_task_per_stage(prefect_harness, tiny_model_dir, tmp_path):
    import yaml

    from pipelines.flows import experiment

    senteval = make_senteval(tmp_path / "senteval")
    params = tiny_params(tiny_model_dir, senteval, tmp_path)
    sections = {k: v for k, v in params.items() if k not in ("model", "root", "dataset", "sample")}
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"out": str(tmp_path / "sweep"), "model": params["model"], **sections,
                                      "rank": {"strategy": "gold"}, "grid": {"train.beta": [0.1, 0.5]}}))
    state = experiment(str(config), return_state=True)
    assert state.is_completed(), state
    assert list(state.result()["rows"]) == ["baseline", "beta=0.1", "beta=0.5"]
    names = [name for name, _ in task_runs(state.state_details.flow_run_id)]
    assert names.count("prepare") == 2 and names.count("train") == 2  # one task per stage per arm
    assert names.count("evaluate") == 3  # the baseline and each arm
    second = experiment(str(config), return_state=True)
    assert {s for _, s in task_runs(second.state_details.flow_run_id)} == {"Cached"}  # resumed: nothing re-ran
