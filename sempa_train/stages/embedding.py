"""Sentence embeddings: PromptEOL from a causal LM (optionally with a LoRA adapter), or a sentence-transformers
encoder as a baseline. One module serves evaluation, scoring and ranking alike.

PromptEOL puts the preprocessed sentence into ``This sentence : "{sentence}" means in one word:"``
and takes the hidden state of the last token of the final layer (after the final norm), with left
padding. For speed it

* encodes each distinct sentence once,
* sorts sentences by token length so a batch carries almost no padding,
* runs the decoder only (no LM head over the vocabulary) and returns only the last position,
* runs the template's opening (``This sentence : "``, the tokens every prompt starts with) once and
  reuses its key/value cache for every batch (``share_prefix``),
* computes the final layer at the last position only, the one PromptEOL reads (``last_position``; other
  positions give that layer only their keys and values),
* uses bf16 weights where the hardware has bf16 matrix units (``dtype="auto"``).

``backend="vllm"`` (``EmbedConfig``) runs the same prompts through vLLM's pooling runner instead (last
token of the final layer, no normalisation) on a merged model folder (``sempa export``). A folder
written by ``sempa export`` brings its own PromptEOL template and layer.

Usage::

    encoder = load_encoder("smollm2-135m-instruct", EmbedConfig())
    vectors = encoder.encode(["A man is playing a guitar.", "Someone plays an instrument."])
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from sempa_train.core.config import EmbedConfig
from sempa_train.core.models import (
    is_sentence_transformers_folder,
    left_pad,
    load_causal_lm,
    load_tokenizer,
    prompteol_settings,
    resolve_device,
    resolve_dtype,
    resolve_model,
    weights_kwargs,
)
from sempa_train.core.templates import PROMPTEOL_TEMPLATE, prompteol_prompt
from sempa_train.core.threads import follow_load
from sempa_train.stages.last_position import last_position_only

log = logging.getLogger(__name__)


class Encoder(Protocol):
    """Anything that turns sentences into a ``(n, dim)`` float32 array."""

    name: str

    def encode(self, sentences: Sequence[str]) -> np.ndarray: ...


class DedupEncoder:
    """Base class: encodes each distinct input once and scatters the vectors back in input order."""

    name: str = ""

    def encode(self, sentences: Sequence[str]) -> np.ndarray:
        unique = list(dict.fromkeys(sentences))
        if not unique:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._encode_unique(unique)
        position = {s: i for i, s in enumerate(unique)}
        return vectors[[position[s] for s in sentences]]

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def _encode_unique(self, sentences: list[str]) -> np.ndarray:
        raise NotImplementedError


class PromptEOLEncoder(DedupEncoder):
    """PromptEOL embeddings of a causal LM (build the model once and pass it in)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        template: str = PROMPTEOL_TEMPLATE,
        batch_size: int = 64,
        layer: int = -1,
        name: str = "",
        show_progress: bool | None = None,
        share_prefix: bool = True,
        last_position: bool = True,
    ) -> None:
        self.model = model
        self.share_prefix = share_prefix
        self.last_position = last_position
        self.decoder = model.get_decoder()  # the transformer without the LM head
        self.tokenizer = tokenizer
        self.template = template
        self.batch_size = batch_size
        self.layer = layer
        self.name = name or getattr(model.config, "_name_or_path", "causal-lm")
        self.show_progress = show_progress

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def prompts(self, sentences: Sequence[str]) -> list[str]:
        """The PromptEOL inputs (preprocessed sentence in the template)."""
        return [prompteol_prompt(s, self.template) for s in sentences]

    @torch.inference_mode()
    def _encode_unique(self, sentences: list[str]) -> np.ndarray:
        token_ids = self.tokenizer(self.prompts(sentences))["input_ids"]
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]), reverse=True)
        out = np.empty((len(sentences), self.dim), dtype=np.float32)
        device = next(self.model.parameters()).device
        prefix = common_prefix(token_ids) if self.share_prefix else []
        prefix_cache = self._prefix_cache(prefix, device) if prefix else None
        batches = range(0, len(order), self.batch_size)
        for start in tqdm(batches, desc="PromptEOL", unit="batch", disable=_tqdm_disable(self.show_progress)):
            if device.type == "cpu":
                follow_load()  # threads fitted to the cores other processes leave free
            idx = order[start : start + self.batch_size]
            out[idx] = self._last_token_states([token_ids[i][len(prefix):] for i in idx], device, prefix_cache)
        return out

    def _prefix_cache(self, prefix: list[int], device: torch.device) -> Any:
        """The decoder's key/value cache of the tokens every prompt starts with."""
        ids = torch.tensor([prefix], device=device)
        return self.decoder(input_ids=ids, use_cache=True).past_key_values

    def _last_token_states(self, batch_ids: list[list[int]], device: torch.device,
                           prefix_cache: Any = None) -> np.ndarray:
        """Final (or ``layer``) hidden state of each sequence's last token; sequences are left padded and, with
        ``prefix_cache``, continue the cached prefix (padding sits between the prefix and the sequence)."""
        input_ids, mask = left_pad(batch_ids, self.tokenizer.pad_token_id, device)
        offset = 0 if prefix_cache is None else prefix_cache.get_seq_length()
        positions = offset + (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {"use_cache": False}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(batch_ids))
            mask = torch.cat([mask.new_ones(len(batch_ids), offset), mask], dim=1)
            kwargs = {"past_key_values": cache, "use_cache": True}
        if self.layer == -1:
            with last_position_only(self.decoder) if self.last_position else nullcontext():
                hidden = self.decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                      **kwargs).last_hidden_state
        else:
            hidden = self.decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                  output_hidden_states=True, **kwargs).hidden_states[self.layer]
        return hidden[:, -1, :].float().cpu().numpy()


class VLLMPromptEOLEncoder(DedupEncoder):
    """PromptEOL through vLLM's pooling runner on a merged model folder: sempa applies the template and tokenises
    (so the token ids are the transformers encoder's), vLLM pools the last token of the final layer."""

    def __init__(self, model_dir: Path, tokenizer: Any, *, template: str = PROMPTEOL_TEMPLATE, dtype: str = "auto",
                 name: str = "", show_progress: bool | None = None) -> None:
        from sempa_train.stages.generation import set_vllm_cpu_env

        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            set_vllm_cpu_env()
        from vllm import LLM
        from vllm.config import PoolerConfig

        if dtype == "auto":
            dtype = "auto" if not on_cpu else "bfloat16" if resolve_dtype("auto", torch.device("cpu")) \
                == torch.bfloat16 else "float32"
        self.llm = LLM(model=str(model_dir), runner="pooling", convert="embed", dtype=dtype, seed=0,
                       pooler_config=PoolerConfig(pooling_type="LAST", use_activation=False),
                       **({"enforce_eager": True} if on_cpu else {}))
        self.tokenizer = tokenizer
        self.template = template
        self.name = name or str(model_dir)
        self.show_progress = show_progress
        self._dim = int(self.llm.llm_engine.model_config.get_hidden_size())

    @property
    def dim(self) -> int:
        return self._dim

    def _encode_unique(self, sentences: list[str]) -> np.ndarray:
        token_ids = self.tokenizer([prompteol_prompt(s, self.template) for s in sentences])["input_ids"]
        outputs = self.llm.embed([{"prompt_token_ids": ids} for ids in token_ids],
                                 use_tqdm=bool(self.show_progress))
        return np.asarray([o.outputs.embedding for o in outputs], dtype=np.float32)

    def close(self) -> None:
        """Stop the engine's processes (its memory is returned)."""
        from sempa_train.stages.generation import close_vllm

        close_vllm(self.llm)


def common_prefix(sequences: Sequence[Sequence[int]]) -> list[int]:
    """The longest run of leading tokens all ``sequences`` share, leaving each at least its last token."""
    if not sequences:
        return []
    first = sequences[0]
    length = min(len(s) for s in sequences) - 1
    for ids in sequences[1:]:
        length = next((k for k in range(length) if ids[k] != first[k]), length)
    return list(first[: max(length, 0)])


class SentenceTransformerEncoder(DedupEncoder):
    """A sentence-transformers model with its own pooling and normalisation (baselines, scoring)."""

    def __init__(self, model: Any, *, batch_size: int = 64, name: str = "", show_progress: bool | None = None) -> None:
        self.model = model
        self.batch_size = batch_size
        self.name = name or "sentence-transformer"
        self.show_progress = bool(show_progress)

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def _encode_unique(self, sentences: list[str]) -> np.ndarray:
        vectors = self.model.encode(sentences, batch_size=self.batch_size, convert_to_numpy=True,
                                    show_progress_bar=self.show_progress)
        return np.asarray(vectors, dtype=np.float32)


def _tqdm_disable(show_progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None (the default) shows the bar only on a terminal."""
    return None if show_progress is None else not show_progress


def encoder_kind(path: Path, requested: str = "auto") -> str:
    """``prompteol`` or ``sentence-transformers``: the requested kind, or the one the folder implies."""
    if requested != "auto":
        return requested
    return "sentence-transformers" if is_sentence_transformers_folder(path) else "prompteol"


def load_encoder(
    model: str | Path,
    cfg: EmbedConfig | None = None,
    *,
    adapter: str | Path | None = None,
    show_progress: bool | None = None,
) -> DedupEncoder:
    """Build the encoder for a model name/folder (and optional LoRA adapter), choosing its kind automatically."""
    cfg = cfg or EmbedConfig()
    path = resolve_model(model)
    kind = encoder_kind(path, cfg.embedding)
    device = resolve_device(cfg.device)
    name = str(model) if adapter is None else f"{model}+{adapter}"
    if kind == "sentence-transformers":
        if adapter is not None:
            raise ValueError("a LoRA adapter applies to PromptEOL (causal LM) embeddings, "
                             "not to a sentence-transformers model")
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(path), device=str(device), model_kwargs=weights_kwargs(path))
        return SentenceTransformerEncoder(st, batch_size=cfg.batch_size, name=name, show_progress=show_progress)
    settings = prompteol_settings(path) or {}
    template, layer = settings.get("template", PROMPTEOL_TEMPLATE), cfg.layer
    if layer == -1 and "layer" in settings:  # an exported folder's own layer, unless one was asked for
        layer = int(settings["layer"])
    if cfg.backend == "vllm":
        if adapter is not None:
            raise ValueError("the vLLM backend loads a merged model folder: merge the adapter first (sempa export, "
                             "or sempa_train.stages.export.merged_folder)")
        log.info("PromptEOL encoder %s with vLLM's pooling runner", name)
        return VLLMPromptEOLEncoder(path, load_tokenizer(path), template=template, dtype=cfg.dtype, name=name,
                                    show_progress=show_progress)
    if cfg.quantize == "int8":
        if device.type != "cpu":
            raise ValueError("quantize=int8 runs on the CPU (dynamic int8 kernels); use dtype=auto on a GPU")
        from sempa_train.stages.quantize import quantize_int8

        lm, tokenizer = load_causal_lm(path, adapter=adapter, dtype=torch.float32, device=device)
        lm = quantize_int8(lm, tokenizer, template=template, layer=layer)
        log.info("PromptEOL encoder %s on cpu (int8, smoothed)", name)
    else:
        dtype = resolve_dtype(cfg.dtype, device)
        lm, tokenizer = load_causal_lm(path, adapter=adapter, dtype=dtype, device=device)
        log.info("PromptEOL encoder %s on %s (%s)", name, device, dtype)
    return PromptEOLEncoder(lm, tokenizer, template=template, batch_size=cfg.batch_size, layer=layer, name=name,
                            show_progress=show_progress)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``(n, d)`` arrays."""
    a = a / np.clip(np.linalg.norm(a, axis=1, keepdims=True), 1e-12, None)
    b = b / np.clip(np.linalg.norm(b, axis=1, keepdims=True), 1e-12, None)
    return np.einsum("ij,ij->i", a, b)
