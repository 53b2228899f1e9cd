"""The final decoder layer computed for the last position only, for PromptEOL.

PromptEOL reads one vector: the last token's output of the final layer. In that layer every other position
contributes only its key and value (the last token attends to them); its query, attention output, o_proj and
MLP are never read. ``last_position_only`` swaps the final layer, for the duration of a forward pass, for one
that computes keys and values for all positions and everything else for the last position alone: about one
layer's worth of work less (1/30 of SmolLM2-135M's), with the same arithmetic for the vector it returns.

It follows the Llama layer (pre-norm attention with rotary embeddings, then a pre-norm MLP) through the
model's own modules and functions, so it is used for the layer classes listed in ``SUPPORTED`` only; for any
other model the full layer runs as before.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

SUPPORTED = ("LlamaDecoderLayer",)


class LastPositionLayer(torch.nn.Module):
    """``layer`` (a Llama decoder layer) with its output computed at the last position only: ``(batch, 1, dim)``."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer
        source = sys.modules[type(layer.self_attn).__module__]
        self.rotary = source.apply_rotary_pos_emb
        self.eager_attention = source.eager_attention_forward

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool = False,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        layer, attention = self.layer, self.layer.self_attn
        batch, length, _ = hidden_states.shape
        normed = layer.input_layernorm(hidden_states)
        query = attention.q_proj(normed[:, -1:]).view(batch, 1, -1, attention.head_dim).transpose(1, 2)
        key = attention.k_proj(normed).view(batch, length, -1, attention.head_dim).transpose(1, 2)
        value = attention.v_proj(normed).view(batch, length, -1, attention.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, _ = self.rotary(query, query, cos[:, -1:], sin[:, -1:])
        key, _ = self.rotary(key, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, attention.layer_idx)
        if isinstance(attention_mask, torch.Tensor):  # (batch, 1, queries, keys): the last query's row
            attention_mask = attention_mask[:, :, -1:, :]
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, self.eager_attention)
        output, _ = attend(attention, query, key, value, attention_mask, dropout=0.0, scaling=attention.scaling,
                           **kwargs)
        hidden = hidden_states[:, -1:] + attention.o_proj(output.reshape(batch, 1, -1))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


@contextmanager
def last_position_only(decoder: Any) -> Iterator[bool]:
    """While open, ``decoder``'s final layer computes the last position only (yields True), where its layer class
    is in ``SUPPORTED``; otherwise nothing changes (yields False). The layer is put back on exit."""
    layers = decoder.layers
    last = layers[-1]
    if type(last).__name__ not in SUPPORTED or len(layers) != decoder.config.num_hidden_layers:
        yield False
        return
    layers[-1] = LastPositionLayer(last)
    try:
        yield True
    finally:
        layers[-1] = last
