"""PromptEOL encoding and DPO steps on a shared machine: torch's threads fitted to the load, or held; quiet and busy.

    python tests/benchmarks/threads_under_load.py --senteval-dir ../shared/data/senteval

A shared machine is not a quiet one: ``--busy`` other processes each keep a core spinning during the busy arms. Each
part runs four arms, side by side in one run: quiet and busy, each with sempa's threads following the load
(``sempa_train.core.threads.follow_load``, the default: re-fitted between batches and between DPO steps) and with
torch's thread count held as it starts (the behaviour before). Encoding: ``--sentences`` sentences of STS-B dev
through ``load_encoder`` (``--dtype``, float32 by default: what a CPU without bf16 units runs), in this process,
each arm starting from torch's default count. Training: ``train_dpo`` with the ``cpu`` preset for ``--steps`` steps
on ``--pairs`` SNLI gold pairs, each arm in a fresh process with its own empty reference-log-prob cache (so its
time includes the reference pass). Writes ``tests/benchmarks/results/threads_under_load[-TAG].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import save

STATES = ("quiet", "busy")
MODES = ("held", "followed")


@contextmanager
def spinning(count: int):
    """``count`` other processes, each keeping a core busy, for the time of the block."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5 if count else 0.0)
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def hold_threads() -> None:
    """The behaviour before: the CPU loops never change torch's count."""
    import sempa_train.stages.embedding as embedding
    import sempa_train.stages.generation as generation
    import sempa_train.stages.retention as retention
    import sempa_train.stages.train as train

    embedding.follow_load = generation.follow_load = retention.follow_load = train.follow_load = torch_threads


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def encode_arms(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import sempa_train.core.threads as threads
    import sempa_train.stages.embedding as embedding
    from sempa_train.core.config import EmbedConfig
    from sempa_train.stages.embedding import load_encoder
    from sempa_train.stages.sts_data import load_senteval_task

    sts = load_senteval_task(args.senteval_dir, "STSBenchmark", "dev")[0]
    sentences = list(dict.fromkeys(sts.sent1 + sts.sent2))[: args.sentences]
    encoder = load_encoder(args.model, EmbedConfig(dtype=args.dtype, batch_size=64), show_progress=False)
    default_threads, follow = torch.get_num_threads(), embedding.follow_load
    encoder.encode(sentences[:64])  # warm-up
    rows: dict[str, Any] = {}
    for state in STATES:
        with spinning(args.busy if state == "busy" else 0):
            for mode in MODES:
                torch.set_num_threads(default_threads)
                threads._FOLLOWER = None  # each followed arm starts from torch's default count, as a fresh process
                embedding.follow_load = follow if mode == "followed" else torch_threads
                started = time.perf_counter()
                encoder.encode(sentences)
                seconds = time.perf_counter() - started
                rows[f"{state}_{mode}"] = {"seconds": round(seconds, 1),
                                           "sentences_per_second": round(len(sentences) / seconds, 1),
                                           "threads_at_end": torch.get_num_threads()}
                print(f"encode {state} {mode}: {rows[f'{state}_{mode}']}", flush=True)
    torch.set_num_threads(default_threads)
    embedding.follow_load = follow
    for state in STATES:
        rows[f"{state}_followed"]["speedup_vs_held"] = round(rows[f"{state}_held"]["seconds"]
                                                             / rows[f"{state}_followed"]["seconds"], 2)
    return {"sentences": len(sentences), "dtype": args.dtype, "default_threads": default_threads, "arms": rows}


def train_arm(args: argparse.Namespace) -> dict[str, Any]:
    """One training arm in this (fresh) process."""
    import torch

    from sempa_train.core.config import TrainConfig
    from sempa_train.stages.train import train_dpo

    if args.mode == "held":
        hold_threads()
    cfg = TrainConfig.preset("cpu").replace(model=args.model, max_steps=args.steps, batch_size=8, seed=0)
    result = train_dpo(cfg, Path(args.data), Path(args.work) / f"{args.arm}")
    runtime = result.metrics["train_runtime"]
    return {"train_seconds": round(runtime, 1), "seconds_per_step": round(runtime / args.steps, 2),
            "bf16": result.metrics["bf16"], "threads_at_end": torch.get_num_threads()}


def train_arms(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from sempa_train.core.config import PrepareConfig
    from sempa_train.core.models import resolve_model
    from sempa_train.stages.prepare import prepare

    model = str(resolve_model(args.model))  # converted once, outside the timed arms
    prepared = prepare(PrepareConfig(source=args.source, max_premises=args.pairs), work / "data")
    rows: dict[str, Any] = {}
    for state in STATES:
        for mode in MODES:
            arm = f"{state}_{mode}"
            env = {**os.environ, "SEMPA_CACHE_DIR": str(work / f"cache-{arm}")}  # its own empty ref-log-prob cache
            cmd = [sys.executable, __file__, "--arm", arm, "--mode", mode, "--data", str(prepared.preferences_dir),
                   "--work", str(work), "--model", model, "--steps", str(args.steps)]
            with spinning(args.busy if state == "busy" else 0):
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"training arm {arm} failed:\n{proc.stderr[-3000:]}")
            rows[arm] = json.loads(line.removeprefix("RESULT "))
            print(f"train {state} {mode}: {rows[arm]}", flush=True)
    for state in STATES:
        rows[f"{state}_followed"]["speedup_vs_held"] = round(rows[f"{state}_held"]["train_seconds"]
                                                             / rows[f"{state}_followed"]["train_seconds"], 2)
    return {"pairs": args.pairs, "steps": args.steps, "batch_size": 8, "arms": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senteval-dir", default="../shared/data/senteval")
    parser.add_argument("--source", default="../shared/data/nli/snli/validation.jsonl")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--sentences", type=int, default=800, help="distinct STS-B dev sentences encoded per arm")
    parser.add_argument("--dtype", default="float32", help="the encoder's dtype (auto: bf16 where the CPU has it)")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="DPO steps per training arm (batch 8)")
    parser.add_argument("--busy", type=int, default=1, help="other processes kept busy (one core each) in busy arms")
    parser.add_argument("--parts", nargs="+", default=["encode", "train"], choices=["encode", "train"])
    parser.add_argument("--tag", default="")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one training arm and print its JSON
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print("RESULT " + json.dumps(train_arm(args)))
        return
    result: dict[str, Any] = {"model": args.model, "busy_processes": args.busy,
                              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if "encode" in args.parts:
        result["encode"] = encode_arms(args)
    if "train" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            result["train"] = train_arms(args, Path(tmp))
    save("threads_under_load", result, tag=args.tag)


if __name__ == "__main__":
    main()
