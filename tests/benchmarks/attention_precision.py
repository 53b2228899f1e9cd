"""One attention call of a DPO training step, forward and backward, in each precision, on the machine at hand.

    python tests/benchmarks/attention_precision.py

The shape of a ``cpu``-preset batch of SmolLM2-135M (8 rows, 9 query heads sharing 3 key/value heads, head
size 64, 83 queries over 116 keys: the packed pair after the shared opening). Arms, each through transformers'
own attention functions, repeated ``--repeats`` times after a warm-up, interleaved so that a drift of the
machine's speed reaches all arms alike:

* ``sdpa_bf16``: bf16 inputs, torch's sdpa kernel in bf16 (what a bf16 autocast step runs by default);
* ``sdpa_fp32_inside_bf16``: the same bf16 inputs computed in fp32 (``sempa_train/stages/fp32_attention.py``,
  what ``sempa train`` runs on a CPU under bf16 autocast);
* ``eager_bf16``: transformers' eager attention (batched products and a softmax) in bf16;
* ``sdpa_fp32``: fp32 inputs, what an fp32 step runs.

Reports the median milliseconds per call of each. Writes ``tests/benchmarks/results/attention_precision[-TAG].json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import save
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import eager_attention_forward

from sempa_train.stages.fp32_attention import sdpa_in_fp32

ARMS: dict[str, tuple[Callable, torch.dtype]] = {
    "sdpa_bf16": (sdpa_attention_forward, torch.bfloat16),
    "sdpa_fp32_inside_bf16": (sdpa_in_fp32, torch.bfloat16),
    "eager_bf16": (eager_attention_forward, torch.bfloat16),
    "sdpa_fp32": (sdpa_attention_forward, torch.float32),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--queries", type=int, default=83)
    parser.add_argument("--keys", type=int, default=116)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    heads, kv_heads, size = 9, 3, 64
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = heads // kv_heads, True, False
    generator = torch.Generator().manual_seed(0)
    # each query sees the keys up to its own position (the keys before the queries are the shared opening)
    mask = torch.ones(args.queries, args.keys, dtype=torch.bool).tril(args.keys - args.queries)
    mask = mask.expand(args.rows, 1, -1, -1)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    inputs = [torch.randn(shape, generator=generator) for shape in (
        (args.rows, heads, args.queries, size), (args.rows, kv_heads, args.keys, size),
        (args.rows, kv_heads, args.keys, size))]

    def call(arm: str) -> float:
        function, dtype = ARMS[arm]
        q, k, v = (t.to(dtype).requires_grad_() for t in inputs)
        attention_mask = additive.to(dtype) if function is eager_attention_forward else mask
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out, _ = function(module, q, k, v, attention_mask, scaling=size ** -0.5, dropout=0.0)
        out.float().sum().backward()
        return (time.perf_counter() - start) * 1e3

    for arm in ARMS:  # warm-up
        call(arm)
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for _ in range(args.repeats):
        for arm in ARMS:
            times[arm].append(call(arm))
    medians = {arm: round(statistics.median(t), 2) for arm, t in times.items()}
    save("attention_precision", {
        "shape": {"rows": args.rows, "heads": heads, "kv_heads": kv_heads, "head_size": size,
                  "queries": args.queries, "keys": args.keys},
        "torch_threads": torch.get_num_threads(), "repeats": args.repeats, "median_ms": medians,
        "quartiles_ms": {arm: [round(q, 2) for q in statistics.quantiles(t, n=4)] for arm, t in times.items()},
    }, tag=args.tag)


if __name__ == "__main__":
    main()
