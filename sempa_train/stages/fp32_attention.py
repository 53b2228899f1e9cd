"""Attention computed in fp32 inside a bf16-autocast training step on a CPU.

Why: torch's CPU scaled-dot-product kernel is slow in bf16, its backward most of all. On 2 Sapphire Rapids
cores (AMX) one attention call of a training batch (8 rows, 9 query heads, 83 queries over 116 keys), forward
and backward, took 16.3 ms in bf16 and 9.8 ms for the same bf16 inputs computed in fp32
(``python tests/benchmarks/attention_precision.py``, which measures it on the machine at hand), and a training
step 7 % less. fp32 attention is also the more precise; the projections around it stay in bf16.

It is transformers' own sdpa attention with its inputs cast up and autocast off inside, registered under
``NAME`` (with sdpa's mask) so a model switches to it through its config and back the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sempa_sdpa_fp32"


def sdpa_in_fp32(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' sdpa attention on fp32 copies of ``query``/``key``/``value``; the output in ``query``'s dtype."""
    with torch.autocast(query.device.type, enabled=False):
        output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                                 attention_mask, **kwargs)
    return output.to(query.dtype), weights


AttentionInterface.register(NAME, sdpa_in_fp32)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_fp32_attention(model: Any) -> bool:
    """Switch ``model`` from sdpa to sdpa in fp32 (True); a model on another implementation is left as it is."""
    if model.config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True
