"""Where PromptEOL encoding spends its time: torch's profiler over sempa's encoder, grouped by kind of work.

    python tests/benchmarks/embed_profile.py --quantize int8 --sentences 800

Encodes the first ``--sentences`` sentences of STS-B dev (both sides, in order) with SmolLM2-135M-Instruct
as ``sempa eval`` would (``--dtype``, ``--quantize``), once to warm up and time, then once under
``torch.profiler``, and sums the operators' own CPU time into groups: int8 matrix products
(``aten::_int_mm``), floating-point matrix products (``aten::mm``/``addmm``/``bmm``/``linear``), attention
(``scaled_dot_product*``) and everything else (norms, rotary embedding, SiLU, (de)quantisation, copies),
with the ten most expensive operators (``common.profile_summary``). It answers how much of the time is
matrix products that a faster number format could shrink, and how much no format change would touch. Writes
``tests/benchmarks/results/embed_profile[-TAG].json``.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import profile_summary, save

from sempa_train.core.config import EmbedConfig
from sempa_train.stages.embedding import load_encoder
from sempa_train.stages.sts_data import load_senteval_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senteval-dir", default="../shared/data/senteval")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--sentences", type=int, default=800)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--quantize", default="none", choices=["none", "int8"])
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    sts = load_senteval_task(args.senteval_dir, "STSBenchmark", "dev")[0]
    sentences = (sts.sent1 + sts.sent2)[: args.sentences]
    encoder = load_encoder(args.model, EmbedConfig(dtype=args.dtype, quantize=args.quantize), show_progress=False)
    start = time.perf_counter()
    encoder.encode(sentences)
    seconds = time.perf_counter() - start
    with torch.profiler.profile() as profile:
        encoder.encode(sentences)
    save("embed_profile", {
        "model": args.model, "sentences": len(sentences), "dtype": args.dtype, "quantize": args.quantize,
        "weights_dtype": str(next(encoder.model.parameters()).dtype), "seconds": round(seconds, 2),
        **profile_summary(profile),
    }, tag=args.tag)


if __name__ == "__main__":
    main()
