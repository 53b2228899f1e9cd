"""Candidate sampling throughput: vLLM backend against transformers backend, side by side in one run.

    python tests/benchmarks/sample_throughput.py --nli ../shared/data/nli/snli/validation.jsonl --sizes 16,512

Same model (SmolLM2-135M-Instruct by default), same prompts (the first N premises of the SNLI file
in template P1 through the chat template), same sampling settings (n=4, temperature 1.0, top_p
0.95, max 64 new tokens, per-premise seeds). Each backend is built once; for every size it
generates the candidates of the same premises. Reported per backend and size: generation seconds,
candidates per second, generated tokens per second, and end-to-end candidates per second with
the one-off start-up cost (model load or engine start) included. Writes
``tests/benchmarks/results/sample_throughput[-<tag>].json``.

A shared machine is not a quiet one: ``--busy 1`` keeps one other process spinning on a core for the
whole run. ``--backends vllm-nobind`` runs vLLM-CPU with ``VLLM_CPU_OMP_THREADS_BIND=nobind`` (its
OpenMP threads not pinned to cores), to compare with the default binding. The transformers backend runs
on the cores other processes leave free (``generation.fit_threads_to_load``); ``--backends
transformers-allthreads`` keeps torch's default thread count instead, to compare. The result also records
what ``--backend auto`` would pick on this machine, and why, and each backend's torch threads.

    python tests/benchmarks/sample_throughput.py --sizes 16 --backends vllm,vllm-nobind,transformers --busy 1 --tag busy
    python tests/benchmarks/sample_throughput.py --sizes 16 --backends transformers,transformers-allthreads --busy 1
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
from common import save

from sempa_train.core.config import SampleConfig
from sempa_train.core.models import load_tokenizer, resolve_model, use_chat_template
from sempa_train.core.templates import PARAPHRASE_TEMPLATES
from sempa_train.core.text import paraphrase_prompt
from sempa_train.stages.generation import build_backend, choose_backend
from sempa_train.stages.sampling import premise_seed
from sempa_train.stages.sources import group_triples, read_nli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nli", default="../shared/data/nli/snli/validation.jsonl")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--sizes", default="16,512", help="comma-separated premise counts")
    parser.add_argument("--backends", default="vllm,transformers")
    parser.add_argument("--batch-size", type=int, default=16, help="transformers: prompts per generate call")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="vLLM: sequences decoded together")
    parser.add_argument("--busy", type=int, default=0, help="other processes kept busy (one core each) meanwhile")
    parser.add_argument("--tag", default="", help="suffix of the result file (e.g. h100)")
    args = parser.parse_args()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        run(args)
    finally:
        for spinner in spinners:
            spinner.kill()


def run(args: argparse.Namespace) -> None:
    auto, reason = choose_backend("auto")

    sizes = [int(s) for s in args.sizes.split(",")]
    triples = group_triples(read_nli(args.nli)).table.head(max(sizes))
    cfg = SampleConfig(model=args.model, n=4, temperature=1.0, top_p=0.95, max_tokens=64, seed=0,
                       batch_size=args.batch_size, max_num_seqs=args.max_num_seqs)
    model_path = resolve_model(args.model)
    tokenizer = load_tokenizer(model_path)
    chat = use_chat_template("auto", tokenizer)
    texts = [paraphrase_prompt(p, PARAPHRASE_TEMPLATES["P1"], tokenizer, chat=chat) for p in triples["premise"]]
    prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]
    seeds = [premise_seed(cfg.seed, pid) for pid in triples["premise_id"]]

    default_threads = torch.get_num_threads()
    results: dict[str, dict[str, object]] = {}
    for name in args.backends.split(","):
        engine = name.split("-")[0]
        if name == "vllm-nobind":
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        start = time.perf_counter()
        torch.set_num_threads(default_threads)  # as the process started, whatever the backend before set
        backend = build_backend(cfg.replace(backend=engine), model_path, engine)
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        if name == "transformers-allthreads":
            torch.set_num_threads(default_threads)
        startup = time.perf_counter() - start
        results[name] = {"startup_seconds": round(startup, 1)}
        if engine == "transformers":
            results[name]["torch_threads"] = torch.get_num_threads()
        for size in sizes:
            start = time.perf_counter()
            generations = backend.generate(prompts[:size], seeds[:size], cfg.generation)
            seconds = time.perf_counter() - start
            candidates = sum(len(g) for g in generations)
            tokens = sum(c.completion_tokens for g in generations for c in g)
            results[name][str(size)] = {
                "premises": size, "candidates": candidates, "generated_tokens": tokens,
                "seconds": round(seconds, 1),
                "candidates_per_second": round(candidates / seconds, 2),
                "tokens_per_second": round(tokens / seconds, 1),
                "candidates_per_second_with_startup": round(candidates / (seconds + startup), 2),
            }
            print(f"{name} {size}: {seconds:.1f}s, {candidates / seconds:.2f} candidates/s, "
                  f"{tokens / seconds:.0f} tokens/s", flush=True)
        if hasattr(backend, "close"):
            backend.close()
        del backend

    ratios: dict[str, dict[str, object]] = {}
    for name in (n for n in results if n.startswith("vllm") and "transformers" in results):
        for size in sizes:
            v, t = results[name][str(size)], results["transformers"][str(size)]
            ratios.setdefault(name, {})[str(size)] = {
                "generation": round(v["candidates_per_second"] / t["candidates_per_second"], 2),
                "with_startup": round(v["candidates_per_second_with_startup"]
                                      / t["candidates_per_second_with_startup"], 2),
            }
    result = {"model": args.model, "settings": {"n": 4, "temperature": 1.0, "top_p": 0.95, "max_tokens": 64,
                                                "transformers_batch_size": args.batch_size,
                                                "vllm_max_num_seqs": args.max_num_seqs},
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "busy_processes": args.busy,
              "auto_backend": {"picked": auto, "reason": reason}, "results": results,
              "vllm_over_transformers": ratios}
    save("sample_throughput", result, tag=args.tag)


if __name__ == "__main__":
    main()
