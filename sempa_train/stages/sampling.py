"""The sample stage: n paraphrase candidates per premise from the policy model, sharded and resumable.

The backends (vLLM or transformers, ``sempa_train.stages.generation``) receive the same token ids: the premise
in the paraphrase template, through the tokenizer's chat template when it has one (``sempa_train.core.text``).

Work is split into shards of ``shard_size`` premises, each written atomically to a work folder
beside the output (``.OUT.shards/``) as soon as it is done. A re-run with the same config skips
finished shards, so a crash (even ``kill -9``) loses at most the shard in progress; when every shard
is there they are concatenated into the ``candidates`` dataset folder and the work folder is removed.
Each premise has its own seed derived from the base seed and its id, so vLLM output does not depend
on how premises are grouped. The vLLM engine runs in a child process, so its memory (GPU memory
included) is returned when sampling ends.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from tqdm.auto import tqdm

from sempa_train.core.config import SampleConfig
from sempa_train.core.io import read_dataset, read_manifest, read_parquet, text_id, write_dataset, write_parquet
from sempa_train.core.models import (
    load_tokenizer,
    resolve_model,
    use_chat_template,
)
from sempa_train.core.procs import call_in_subprocess
from sempa_train.core.schemas import CANDIDATES_SCHEMA
from sempa_train.core.shards import ShardPlan, ShardRunner, open_shards, work_dir_for
from sempa_train.core.templates import resolve_template
from sempa_train.core.text import clean_candidate, paraphrase_prompt
from sempa_train.stages.generation import GenerationBackend, build_backend, resolve_backend

log = logging.getLogger(__name__)

def premise_seed(seed: int, premise_id: str) -> int:
    """The premise's own sampling seed (stable across shard layouts and backends)."""
    return int(text_id(str(seed), premise_id), 16) % (2**31 - 1)


def plan_shards(cfg: SampleConfig, triples: Path, out_dir: Path) -> ShardPlan:
    """Split the premises of ``triples`` into shards; reuse (and check) an earlier run's work folder."""
    table = read_dataset(triples, "triples").unique("premise_id", keep="first", maintain_order=True)
    if cfg.max_premises is not None:
        table = table.head(cfg.max_premises)
    if table.is_empty():
        raise ValueError(f"{triples}: no premises to sample")
    return open_shards(out_dir, table["premise_id"].to_list(), table["premise"].to_list(), cfg.shard_size,
                       cfg.to_dict())


def sample_shard(
    backend: GenerationBackend, tokenizer: Any, cfg: SampleConfig, premise_ids: Sequence[str], premises: Sequence[str],
    *, model_name: str, chat: bool,
) -> pl.DataFrame:
    """Generate and clean the candidates of one shard, as a ``CANDIDATES_SCHEMA`` table."""
    template_id, template_text = resolve_template(cfg.template)
    texts = [paraphrase_prompt(p, template_text, tokenizer, chat=chat) for p in premises]
    prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]
    fits = [len(prompt) + cfg.max_tokens <= cfg.max_model_len for prompt in prompts]
    if not all(fits):  # skipped and counted when assembled, never a failed shard
        log.warning("sample: %d prompt(s) longer than max_model_len - max_tokens skipped", fits.count(False))
        premise_ids, premises, prompts = ([x for x, ok in zip(items, fits, strict=True) if ok]
                                          for items in (premise_ids, premises, prompts))
    if not prompts:
        return pl.DataFrame(schema=CANDIDATES_SCHEMA)
    seeds = [premise_seed(cfg.seed, pid) for pid in premise_ids]
    generations = backend.generate(prompts, seeds, cfg.generation)
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
        premise_ids, premises = plan.shard_items(index)
        table = sample_shard(self.backend, self.tokenizer, cfg, premise_ids, premises, model_name=cfg.model,
                             chat=self.chat)
        write_parquet(table, plan.shard_path(index), CANDIDATES_SCHEMA)

    def close(self) -> None:
        self.backend.close()


def run_shards(cfg: SampleConfig, plan: ShardPlan, backend_name: str, *, show_progress: bool | None = None) -> None:
    """Build the backend once and write every pending shard (atomically, in order)."""
    pending = plan.pending()
    if not pending:
        return
    sampler = Sampler.build(cfg, backend_name)
    try:
        with tqdm(total=len(plan.ids), initial=plan.done_items(), unit="premise", desc=f"sample ({backend_name})",
                  disable=None if show_progress is None else not show_progress) as bar:
            for index in pending:
                sampler.write_shard(cfg, plan, index)
                bar.update(len(plan.shard_items(index)[0]))
    finally:
        sampler.close()


_PROCESS_SAMPLERS: dict[str, Sampler] = {}


def sample_one_shard(cfg: SampleConfig, plan: ShardPlan, index: int, *, backend_name: str) -> int:
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
    shard_runner: ShardRunner | None = None,
) -> SampleResult:
    """Sample candidates for every premise of ``triples`` into the dataset folder ``out_dir`` (resumable).

    ``shard_runner`` replaces how pending shards are produced (a distributed runner, a test double): it gets
    ``one_shard(index)`` and the pending indices. By default vLLM runs in a child process and transformers in
    this one.
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
        shard_runner(functools.partial(sample_one_shard, cfg, plan, backend_name=backend), plan.pending())
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
        "premises": len(plan.ids),
        "candidates": table.height,
        "shards": plan.n_shards,
        "empty_after_cleaning": int((table["text"] == "").sum()),
        "truncated": int((table["finish_reason"] == "length").sum()),
        "skipped_prompt_too_long": len(plan.ids) - table["premise_id"].n_unique(),
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
