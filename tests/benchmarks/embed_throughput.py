"""PromptEOL embedding throughput: sempa's encoder against a straightforward loop, side by side in one run.

    python tests/benchmarks/embed_throughput.py --senteval-dir ../shared/data/senteval

Both encode every sentence of STS-B dev (3,000 sentences, both sides of 1,500 pairs) with
SmolLM2-135M-Instruct and score the pairs (Spearman x 100 of cosine). The baseline is the obvious
implementation: fp32 weights, batches of 64 in file order, left padding, the full causal LM with
``output_hidden_states=True``, every sentence encoded even when repeated. sempa's encoder is run in
fp32 (what a CPU without bf16 units runs: the speed-up from dedup, length sorting, skipping the LM
head and the shared template prefix), in fp32 without the shared prefix (to show what it adds), and
with ``dtype=auto`` (bf16 where the CPU has bf16 units), and, as a lever tried and not kept in the library,
fp32 with the decoder under ``torch.compile`` (inductor, dynamic shapes, frozen weights; without the shared
prefix, whose key/value cache object would recompile the graph): its one-off compile (on a 128-sentence
warm-up) is reported apart and added to its STS7 time; and ``quantize=int8`` (SmoothQuant-style smoothing,
dynamic int8 q/k/v and gate/up projections; its setup, calibration included, reported apart), and, as a
lever under test, the same with down_proj in int8 in every layer (``sempa_int8_down_proj``; its input smoothed
as well), and the library's int8 with the final layer computed at every position (``sempa_int8_full_last_layer``:
what computing it at the last position only saves), and the library's int8 model on each int8 kernel this torch
has (``sempa_int8_onednn``, ``sempa_int8_fbgemm``: whichever ``sempa_train.stages.int8_kernels`` picks).
Each arm's Spearman change from the baseline comes with its 95 % paired-bootstrap interval over the pairs.
``--arms`` runs a subset (the baseline always runs). Runs alternate (baseline, fp32, ...,
baseline, ...) so background load hits all alike; the median of ``--repeats`` is reported, with the
time a full STS7 workload (37.7k sentences) would take at each rate.
Writes ``tests/benchmarks/results/embed_throughput[-TAG].json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch._inductor.config
from common import save
from int8_fidelity import LAYER_SETS

from sempa_train.core.config import EmbedConfig
from sempa_train.core.models import load_causal_lm
from sempa_train.core.templates import PROMPTEOL_TEMPLATE, prompteol_prompt
from sempa_train.stages import int8_kernels
from sempa_train.stages.embedding import PromptEOLEncoder, cosine, load_encoder
from sempa_train.stages.evaluation import paired_bootstrap, spearman100
from sempa_train.stages.quantize import quantize_int8
from sempa_train.stages.sts_data import load_senteval_task

ARMS = ["baseline_fp32", "sempa_fp32_no_shared_prefix", "sempa_fp32", "sempa_auto", "sempa_fp32_compiled",
        "sempa_int8", "sempa_int8_down_proj", "sempa_int8_full_last_layer",
        *(f"sempa_int8_{kernel}" for kernel in int8_kernels.available())]
STS7_SENTENCES = 37_700  # both sides of every pair of STS12-16, STS-B test and SICK-R test


def naive_encode(model, tokenizer, sentences: list[str], batch_size: int = 64) -> np.ndarray:
    """The straightforward loop: fp32, file order, full model, all hidden states, no dedup."""
    tokenizer.padding_side = "left"
    out = []
    with torch.no_grad():
        for start in range(0, len(sentences), batch_size):
            prompts = [prompteol_prompt(s) for s in sentences[start : start + batch_size]]
            batch = tokenizer(prompts, padding=True, return_tensors="pt")
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1][:, -1, :]
            out.append(hidden.float().numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senteval-dir", default="../shared/data/senteval")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tag", default="")
    parser.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS, help="which encoders to run (default: all; "
                        "baseline_fp32 always runs)")
    args = parser.parse_args()
    args.arms = ["baseline_fp32", *[arm for arm in args.arms if arm != "baseline_fp32"]]

    sts = load_senteval_task(args.senteval_dir, "STSBenchmark", "dev")[0]
    sentences = sts.sent1 + sts.sent2
    n = len(sts)

    def similarities(vectors: np.ndarray) -> np.ndarray:
        return cosine(vectors[:n], vectors[n:])

    naive_model, naive_tok = load_causal_lm(args.model, dtype=torch.float32)
    ours_fp32 = load_encoder(args.model, EmbedConfig(dtype="float32", batch_size=64), show_progress=False)
    ours_fp32_no_prefix = PromptEOLEncoder(ours_fp32.model, ours_fp32.tokenizer, batch_size=64, show_progress=False,
                                           share_prefix=False)
    ours_auto = load_encoder(args.model, EmbedConfig(dtype="auto", batch_size=64), show_progress=False)
    start = time.perf_counter()
    ours_int8 = (load_encoder(args.model, EmbedConfig(quantize="int8", batch_size=64), show_progress=False)
                 if {"sempa_int8", "sempa_int8_full_last_layer"} & set(args.arms) else None)
    int8_setup_seconds = time.perf_counter() - start  # loading, calibration and quantisation
    ours_int8_down = (PromptEOLEncoder(quantize_int8(ours_fp32.model, ours_fp32.tokenizer, template=PROMPTEOL_TEMPLATE,
                                                     names=LAYER_SETS["with_down_proj"]),
                                       ours_fp32.tokenizer, batch_size=64, show_progress=False)
                      if "sempa_int8_down_proj" in args.arms else None)
    ours_int8_full_last = (PromptEOLEncoder(ours_int8.model, ours_int8.tokenizer, batch_size=64, show_progress=False,
                                            last_position=False)
                           if ours_int8 is not None and "sempa_int8_full_last_layer" in args.arms else None)
    ours_int8_kernels = {  # the library's int8 model on each kernel, whichever int8_kernels.chosen() picks
        f"sempa_int8_{kernel}": PromptEOLEncoder(quantize_int8(ours_fp32.model, ours_fp32.tokenizer,
                                                               template=PROMPTEOL_TEMPLATE, kernel=kernel),
                                                 ours_fp32.tokenizer, batch_size=64, show_progress=False)
        for kernel in int8_kernels.available() if f"sempa_int8_{kernel}" in args.arms}
    ours_compiled = PromptEOLEncoder(ours_fp32.model, ours_fp32.tokenizer, batch_size=64, show_progress=False,
                                     share_prefix=False)
    ours_compiled.decoder = torch.compile(ours_compiled.decoder, dynamic=True)

    def compiled_encode(texts: list[str]) -> np.ndarray:
        with torch._inductor.config.patch(freezing=True):  # weights folded into the graph as constants
            return ours_compiled.encode(texts)

    compile_seconds = 0.0
    if "sempa_fp32_compiled" in args.arms:
        start = time.perf_counter()
        compiled_encode(sentences[:128])  # compiles (or loads the inductor cache)
        compile_seconds = time.perf_counter() - start
        print(f"compile + warm-up: {compile_seconds:.1f}s", flush=True)
    runners = {
        "baseline_fp32": lambda: naive_encode(naive_model, naive_tok, sentences),
        "sempa_fp32_no_shared_prefix": lambda: ours_fp32_no_prefix.encode(sentences),
        "sempa_fp32": lambda: ours_fp32.encode(sentences),
        "sempa_auto": lambda: ours_auto.encode(sentences),
        "sempa_fp32_compiled": lambda: compiled_encode(sentences),
        "sempa_int8": lambda: ours_int8.encode(sentences),
        "sempa_int8_down_proj": lambda: ours_int8_down.encode(sentences),
        "sempa_int8_full_last_layer": lambda: ours_int8_full_last.encode(sentences),
        **{name: lambda encoder=encoder: encoder.encode(sentences) for name, encoder in ours_int8_kernels.items()},
    }
    runners = {name: run for name, run in runners.items() if name in args.arms}
    times: dict[str, list[float]] = {k: [] for k in runners}
    sims: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            vectors = run()
            times[name].append(time.perf_counter() - start)
            sims[name] = similarities(vectors)
            print(f"{name}: {times[name][-1]:.1f}s spearman {spearman100(sims[name], sts.scores):.2f}", flush=True)

    gold = np.asarray(sts.scores)
    scores = {name: spearman100(sim, gold) for name, sim in sims.items()}

    base = statistics.median(times["baseline_fp32"])
    rows = {
        name: {
            "seconds": round(statistics.median(t), 2),
            "sentences_per_second": round(len(sentences) / statistics.median(t), 1),
            "speedup_vs_baseline": round(base / statistics.median(t), 2),
            "stsb_dev_spearman": round(scores[name], 2),
            "spearman_delta_vs_baseline": round(scores[name] - scores["baseline_fp32"], 2),
            # 95 % paired bootstrap over the 1,500 pairs: what one dev set's sampling noise allows
            "spearman_delta_ci95": [round(x, 2) for x in paired_bootstrap(gold, sims["baseline_fp32"], sims[name])],
            "sts7_minutes_extrapolated": round(STS7_SENTENCES / (len(sentences) / statistics.median(t)) / 60, 1),
        }
        for name, t in times.items()
    }
    if "sempa_fp32_compiled" in rows:
        rows["sempa_fp32_compiled"]["compile_seconds"] = round(compile_seconds, 1)
        rows["sempa_fp32_compiled"]["sts7_minutes_extrapolated"] = round(
            rows["sempa_fp32_compiled"]["sts7_minutes_extrapolated"] + compile_seconds / 60, 1)
    if "sempa_int8" in rows:
        rows["sempa_int8"]["setup_seconds"] = round(int8_setup_seconds, 1)
    result = {
        "model": args.model,
        "sentences": len(sentences),
        "unique_sentences": len(set(sentences)),
        "repeats": args.repeats,
        "dtype_auto_resolved": str(next(ours_auto.model.parameters()).dtype),
        # the int8 matrix product the int8 arms ran, and the probe's readings it was chosen on (seconds per product;
        # taken for the record when SEMPA_INT8_KERNEL named the kernel)
        **({"int8_kernel": int8_kernels.chosen(), "int8_kernel_times": int8_kernels.probe_times()}
           if any(name.startswith("sempa_int8") for name in rows) else {}),
        "results": rows,
    }
    save("embed_throughput", result, tag=args.tag)


if __name__ == "__main__":
    main()
