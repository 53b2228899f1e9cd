"""Orchestration overhead of one ``full`` flow run against calling the same library functions directly.

    python tests/benchmarks/orchestration_overhead.py

With a tiny random model (so the stages themselves are short and the overhead shows), both paths
run prepare → sample → rank → train → evaluate (base and tuned) on the built-in NLI sample and a
small STS fixture. "direct" calls the ``sempa_train`` stage functions one after the other in this
process; "flow" calls the Prefect flow in this process (tasks, result persistence, artifacts,
dataset publishing, heavy stages in subprocesses) against a local Prefect API. Runs alternate,
each with a fresh output folder (no cache hits). Writes ``tests/benchmarks/results/orchestration_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import prefect_server, save

from sempa_train.core.testing import build_tiny_llama
from sempa_train.plan import RunConfig
from sempa_train.stages.evaluation import run_sts_eval
from sempa_train.stages.prepare import prepare
from sempa_train.stages.ranking import rank
from sempa_train.stages.sampling import sample_candidates
from sempa_train.stages.train import train_dpo

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "nli_sample.jsonl"


def write_sts_dev(root: Path) -> Path:
    """A small STS-B dev file in SentEval layout (pairs built from the NLI sample)."""
    folder = root / "STS" / "STSBenchmark"
    folder.mkdir(parents=True)
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    lines = [f"g\tf\t2020\t{i:04d}\t{(2 - r['label']) * 2.5 if r['label'] >= 0 else 2.5:.1f}\t{r['premise']}\t"
             f"{r['hypothesis']}" for i, r in enumerate(rows)]
    (folder / "sts-dev.csv").write_text("\n".join(lines) + "\n")
    return root


def params(model: Path, senteval: Path, root: Path) -> dict:
    return {
        "model": str(model),
        "prepare": {"source": str(SAMPLE)},
        "sample": {"backend": "transformers", "n": 2, "max_tokens": 16, "shard_size": 16, "dtype": "float32"},
        "rank": {"strategy": "sampled", "min_length_ratio": 0.0, "max_length_ratio": 100.0, "drop_truncated": False},
        "train": {"max_steps": 4, "batch_size": 4},
        "eval": {"senteval_dir": str(senteval), "tasks": ["STSBenchmark"], "split": "dev"},
        "embed": {"dtype": "float32"},
        "root": str(root),
    }


def run_direct(p: dict, root: Path) -> None:
    cfg = RunConfig.build(overrides={k: p[k] for k in ("prepare", "sample", "rank", "train", "eval", "embed")},
                          model=p["model"])
    prepared = prepare(cfg.prepare, root / "prepare")
    sample_candidates(cfg.sample, prepared.triples_dir, root / "candidates", show_progress=False)
    rank(cfg.rank, root / "preferences", triples=prepared.triples_dir, candidates=root / "candidates")
    trained = train_dpo(cfg.train, root / "preferences", root / "model")
    run_sts_eval(p["model"], cfg.eval, cfg.embed, out=root / "base.json")
    run_sts_eval(p["model"], cfg.eval, cfg.embed, adapter=trained.adapter_dir, out=root / "tuned.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with prefect_server():
        compare(args)


def compare(args: argparse.Namespace) -> None:
    from pipelines.flows import sempa

    times: dict[str, list[float]] = {"direct": [], "flow": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_llama(tmp / "tiny", [json.loads(x)["premise"] for x in SAMPLE.read_text().splitlines()])
        senteval = write_sts_dev(tmp / "senteval")
        for i in range(args.repeats):
            for name in ("direct", "flow"):
                root = tmp / f"{name}-{i}"
                p = params(model, senteval, root)
                start = time.perf_counter()
                if name == "direct":
                    run_direct(p, root)
                else:
                    sempa(**p)
                times[name].append(time.perf_counter() - start)
                print(f"{name}: {times[name][-1]:.1f}s", flush=True)
    direct, flowed = statistics.median(times["direct"]), statistics.median(times["flow"])
    result = {"times": {k: [round(t, 2) for t in v] for k, v in times.items()},
              "direct_seconds": round(direct, 2), "flow_seconds": round(flowed, 2),
              "overhead_seconds": round(flowed - direct, 2), "flow_over_direct": round(flowed / direct, 2)}
    save("orchestration_overhead", result)


if __name__ == "__main__":
    main()
