"""torch's thread count fitted to the cores other processes leave free (sempa_train.core.threads), and the CPU loops
that keep it fitted: PromptEOL batches, perplexity batches, generation batches, DPO steps."""

import os
import subprocess
import sys
import time

import pytest
import torch

from sempa_train.core import threads
from sempa_train.core.config import EmbedConfig, TrainConfig
from sempa_train.core.threads import LoadFollower, busy_cores, fit_threads_to_load


@pytest.fixture
def four_cpus(monkeypatch):
    """A machine of 4 usable CPUs, no OMP_NUM_THREADS, and torch's count put back afterwards."""
    count = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    yield
    torch.set_num_threads(count)


@pytest.fixture
def spinner():
    """Another process keeping one core busy."""
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield process
    process.kill()


def test_busy_cores_sees_another_process(spinner):
    assert busy_cores(interval=1.0) > 0.5


def test_threads_fit_the_cores_other_processes_leave(four_cpus, monkeypatch):
    torch.set_num_threads(4)
    assert fit_threads_to_load(busy=0.2) == 4 and torch.get_num_threads() == 4  # a quiet machine: unchanged
    assert fit_threads_to_load(busy=1.0) == 3 and torch.get_num_threads() == 3
    assert fit_threads_to_load(busy=7.0) == 1 and torch.get_num_threads() == 1  # never below one
    assert fit_threads_to_load(busy=0.0, most=4) == 4  # grows back up to the ceiling it is given
    torch.set_num_threads(2)
    assert fit_threads_to_load(busy=1.0) == 2  # never more than torch had: 3 cores free, 2 threads
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert fit_threads_to_load(busy=3.0) == 2 and torch.get_num_threads() == 2  # the user's count is kept


def test_the_follower_refits_as_the_load_comes_and_goes(four_cpus, monkeypatch):
    readings = iter([
        (0.0, 0.0, 0.0), (0.0, 0.0, 0.25),  # first look, over a short wait: nothing else busy -> 4 threads
        (1.0, 0.5, 1.0),  # before min_interval: not measured
        (6.5, 2.5, 2.25),  # since the first look others used 6.5 - 2.5 = 4 CPU-seconds in 2 s: 2 cores busy
        (8.5, 4.5, 4.25),  # others used 0 in the last 2 s: back to the ceiling
        (22.5, 4.5, 6.25),  # others used 14 in 2 s: 7 cores busy -> never below one
        (24.5, 6.5, 8.25),
    ])
    waits = []
    torch.set_num_threads(4)
    follow = LoadFollower(min_interval=2.0, read=lambda: next(readings), sleep=waits.append)
    assert [follow() for _ in range(5)] == [4, 4, 2, 4, 1]
    assert waits == [0.25]  # only the first look waits
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert follow() == 1  # the user's count is kept (torch's count is what OMP_NUM_THREADS set)


def test_the_first_look_sees_a_busy_neighbour_before_any_work(spinner, monkeypatch):
    count = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    try:
        torch.set_num_threads(2)
        assert LoadFollower(most=2, first_look=1.0)() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(count)


def test_the_follower_measures_a_busy_neighbour_while_this_process_works(spinner, monkeypatch):
    count = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    try:
        follow = LoadFollower(most=2, min_interval=1.0, first_look=0.0)
        follow()
        torch.set_num_threads(2)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # this process's own work is not counted as load
            pass
        assert follow() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(count)


@pytest.fixture
def follow_calls(monkeypatch):
    """Counts the CPU loops' calls of ``follow_load`` (the modules import it by name)."""
    import sempa_train.stages.embedding as embedding
    import sempa_train.stages.generation as generation
    import sempa_train.stages.retention as retention
    import sempa_train.stages.train as train

    calls = []
    for module in (embedding, generation, retention, train, threads):
        monkeypatch.setattr(module, "follow_load", lambda: calls.append(1) or torch.get_num_threads())
    return calls


def test_prompteol_and_perplexity_follow_the_load_between_batches(tiny_model_dir, follow_calls):
    from sempa_train.stages.embedding import load_encoder
    from sempa_train.stages.retention import perplexity

    encoder = load_encoder(tiny_model_dir, EmbedConfig(dtype="float32", batch_size=2), show_progress=False)
    encoder.encode(["one sentence.", "a second one.", "and a third sentence here.", "four.", "five, the last."])
    assert len(follow_calls) == 3  # 5 distinct sentences in batches of 2
    perplexity(encoder.model, encoder.tokenizer, ["a text to score."] * 3, batch_size=2)
    assert len(follow_calls) == 5


def test_dpo_steps_on_cpu_follow_the_load(tiny_model_dir, sample_prefs, tmp_path, follow_calls):
    from sempa_train.stages.train import train_dpo

    train_dpo(TrainConfig(model=str(tiny_model_dir), max_steps=2, batch_size=4, logging_steps=1), sample_prefs,
              tmp_path / "model")
    assert len(follow_calls) == 3  # once before the reference pass, then after each step


def test_transformers_sampling_follows_the_load_between_batches(tiny_model_dir, follow_calls):
    from sempa_train.core.config import GenerationParams, SampleConfig
    from sempa_train.stages.generation import build_backend

    backend = build_backend(SampleConfig(model=str(tiny_model_dir), device="cpu"), tiny_model_dir, "transformers")
    assert len(follow_calls) == 1  # a first look before the model is loaded
    backend.generate([[1, 2, 3], [4, 5], [6]], [0, 1, 2], GenerationParams(n=1, max_tokens=2, batch_size=2))
    backend.close()
    assert len(follow_calls) == 3  # then one before each of the 2 batches
