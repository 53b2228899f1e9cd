"""Shared fixtures: a tiny Llama model with a byte-level BPE tokenizer, built offline once per session."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failing hub lookup would otherwise wait ~50 s
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Cached results (reference log-probs, base-model evaluations) go to a folder of this test session alone.
os.environ["SEMPA_CACHE_DIR"] = tempfile.mkdtemp(prefix="sempa-test-cache-")
# Flow runs in tests read and write pytest's temporary folders: allow any path (test_pipelines checks the guard).
os.environ["SEMPA_ALLOWED_PATHS"] = "*"
# torch's thread count held where it starts, so a busy machine cannot change it between two runs a test compares
# (sempa_train.core.threads keeps a count set this way; tests/test_threads.py unsets it where it tests the fitting).
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_NLI = REPO / "data" / "nli_sample.jsonl"


def _corpus() -> list[str]:
    lines = [json.loads(line) for line in SAMPLE_NLI.read_text().splitlines()]
    return [r["premise"] for r in lines] + [r["hypothesis"] for r in lines]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 128, head size 64) and a 600-token byte-level BPE tokenizer."""
    from sempa_train.core.testing import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), _corpus())


@pytest.fixture(scope="session")
def sample_prefs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The gold preference dataset of the built-in NLI sample."""
    from sempa_train.core.config import PrepareConfig
    from sempa_train.stages.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "sample"
    return prepare(PrepareConfig(source=str(SAMPLE_NLI)), out).preferences_dir


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def kill_after_shards(args: list[str], work: Path, shards: int = 2, timeout: float = 120.0) -> int:
    """Run the command ``args``, SIGKILL it once ``shards`` shard files are in ``work``; the finished shards."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(work.glob("shard-*.parquet"))) < shards and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(list(work.glob("shard-*.parquet")))
