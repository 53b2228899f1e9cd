"""Embed a corpus: texts from a file → a Parquet dataset of ``(id, text, vector)``, resumable in shards.

``sempa embed SOURCE --model M [--adapter A] --out DIR`` (and the ``embed`` stage of the plan) reads a
``.txt`` file (one text a line) or a column of a ``.jsonl``/``.csv``/``.parquet`` file, embeds each
*distinct* text once (repeats are counted in the card, not stored twice), optionally L2-normalised,
and writes a dataset folder that polars and ``datasets`` open as is::

    pl.read_parquet("DIR/data.parquet")          # id, text, vector (fixed-size float32 list)
    datasets.load_dataset("parquet", data_files="DIR/data.parquet")

Its manifest names the model, the adapter (and the hash of its weights), the embedding config and the
code version, so ``sempa search`` embeds a query the same way. Work is split into shards
(``sempa_train.core.shards``): a killed run started again keeps the finished shards and produces the
same table.
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from sempa_train.core.config import CorpusConfig, EmbedConfig
from sempa_train.core.io import (
    file_sha256,
    read_manifest,
    read_parquet,
    resolve_dataset_file,
    text_id,
    write_dataset,
    write_parquet,
)
from sempa_train.core.models import adapter_sha256
from sempa_train.core.schemas import embeddings_schema
from sempa_train.core.shards import ShardPlan, ShardRunner, open_shards, work_dir_for
from sempa_train.stages.embedding import load_encoder
from sempa_train.stages.export import merged_folder

log = logging.getLogger(__name__)

SOURCE_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
DEFAULT_COLUMN = "text"


def read_corpus(path: Path | str, column: str | None = None) -> tuple[list[str], dict[str, int]]:
    """The texts of ``path`` in file order (stripped; empty ones dropped) and counts (``rows``, ``empty``).

    A ``.txt`` file holds one text a line; a ``.jsonl``/``.csv``/``.parquet`` file a column of strings
    (``column``, else ``text``, else its only string column)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such corpus file")
    suffix = path.suffix.lower()
    if suffix not in SOURCE_SUFFIXES:
        raise ValueError(f"{path}: unsupported corpus format {suffix!r}; use one of {', '.join(SOURCE_SUFFIXES)}")
    if suffix == ".txt":
        values: list[Any] = path.read_text(encoding="utf-8").splitlines()
    else:
        table = _read_table(path, suffix)
        name = pick_column(table, column, path)
        if table.schema[name] != pl.String:
            raise ValueError(f"{path}: column {name!r} holds {table.schema[name]}, not text")
        values = table[name].to_list()
    texts = [v.strip() for v in values if v is not None and v.strip()]
    return texts, {"rows": len(values), "empty": len(values) - len(texts)}


def _read_table(path: Path, suffix: str) -> pl.DataFrame:
    try:
        if suffix == ".jsonl":
            return pl.read_ndjson(path, infer_schema_length=None)
        if suffix == ".csv":
            return pl.read_csv(path, infer_schema_length=10_000)
        return pl.read_parquet(path)
    except Exception as e:  # polars raises several types for a malformed file
        raise ValueError(f"{path}: cannot be read as {suffix[1:]} ({e})") from e


def pick_column(table: pl.DataFrame, column: str | None, path: Path) -> str:
    """The text column: ``column`` when given, else ``text``, else the table's only string column."""
    if column is not None:
        if column not in table.columns:
            raise ValueError(f"{path}: no column {column!r}; columns found: {', '.join(table.columns) or 'none'}")
        return column
    if DEFAULT_COLUMN in table.columns:
        return DEFAULT_COLUMN
    strings = [name for name, dtype in table.schema.items() if dtype == pl.String]
    if len(strings) == 1:
        return strings[0]
    raise ValueError(f"{path}: no column {DEFAULT_COLUMN!r}; pass --column (columns found: "
                     f"{', '.join(table.columns) or 'none'})")


@dataclass(frozen=True)
class EmbedJob:
    """What every shard is embedded with (picklable, so Dask workers can run shards)."""

    model: str
    adapter: str | None
    embed: EmbedConfig
    normalize: bool

    def fingerprint(self) -> dict[str, Any]:
        """What the shards depend on (the adapter by the hash of its weights, not its path)."""
        return {"model": self.model, "adapter_sha256": adapter_sha256(self.adapter), "embed": self.embed.to_dict(),
                "normalize": self.normalize}

    def encoder(self) -> Any:
        """The encoder of this job, built once per process."""
        return _encoder(self)

    def vectors(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self.encoder().encode(list(texts)).astype(np.float32)
        if self.normalize:
            vectors /= np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
        return vectors

    def write_shard(self, plan: ShardPlan, index: int) -> int:
        """Embed shard ``index`` and write it atomically; a finished shard is not redone. Returns its size."""
        ids, texts = plan.shard_items(index)
        if not plan.shard_path(index).is_file():
            vectors = self.vectors(texts)
            table = shard_table(ids, texts, vectors)
            write_parquet(table, plan.shard_path(index), embeddings_schema(vectors.shape[1]))
        return len(ids)


@functools.lru_cache(maxsize=2)
def _encoder(job: EmbedJob) -> Any:
    if job.embed.backend == "vllm" and job.adapter is not None:  # vLLM loads a merged folder, made once per adapter
        return load_encoder(str(merged_folder(job.model, job.adapter)), job.embed, show_progress=False)
    return load_encoder(job.model, job.embed, adapter=job.adapter, show_progress=False)


def embed_one_shard(job: EmbedJob, plan: ShardPlan, index: int) -> int:
    """One shard, for distributed runners (``ShardRunner``): the encoder is built once per worker process."""
    return job.write_shard(plan, index)


def shard_table(ids: Sequence[str], texts: Sequence[str], vectors: np.ndarray) -> pl.DataFrame:
    """The rows of one shard: id, text and the vector as a fixed-size float32 list."""
    dim = vectors.shape[1]
    return pl.DataFrame({"id": list(ids), "text": list(texts),
                         "vector": pl.Series("vector", vectors, dtype=pl.Array(pl.Float32, dim))})


@dataclass(frozen=True)
class EmbedResult:
    out_dir: Path
    counts: dict[str, int]


def embed_corpus(
    source: Path | str,
    out_dir: Path | str,
    *,
    model: str,
    adapter: str | Path | None = None,
    embed: EmbedConfig | None = None,
    corpus: CorpusConfig | None = None,
    overwrite: bool = False,
    show_progress: bool | None = None,
    shard_runner: ShardRunner | None = None,
) -> EmbedResult:
    """Embed the distinct texts of ``source`` into the dataset folder ``out_dir`` (resumable in shards).

    ``shard_runner`` replaces how pending shards are produced (a Dask cluster, a test double)."""
    source, out_dir = Path(source), Path(out_dir)
    embed, corpus = embed or EmbedConfig(), (corpus or CorpusConfig()).replace(source=str(source))
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    if overwrite:
        shutil.rmtree(work_dir_for(out_dir), ignore_errors=True)
    texts, counts = read_corpus(source, corpus.column)
    if not texts:
        raise ValueError(f"{source}: no text to embed ({counts['rows']:,} rows, all empty)")
    distinct = list(dict.fromkeys(texts))
    counts.update(texts=len(texts), distinct=len(distinct), duplicates=len(texts) - len(distinct))
    job = EmbedJob(str(model), None if adapter is None else str(adapter), embed, corpus.normalize)
    fingerprint = job.fingerprint()  # hashes the adapter's weights once
    plan = open_shards(out_dir, [text_id(t) for t in distinct], distinct, corpus.shard_size,
                       {**fingerprint, "corpus": corpus.to_dict()})
    if plan.n_shards - len(plan.pending()):
        log.info("embed: resuming, %d of %d shards already done in %s", plan.n_shards - len(plan.pending()),
                 plan.n_shards, plan.work_dir)
    if shard_runner is not None:
        shard_runner(functools.partial(embed_one_shard, job, plan), plan.pending())
    else:
        try:
            with tqdm(total=len(distinct), initial=plan.done_items(), unit="text", desc="embed",
                      disable=None if show_progress is None else not show_progress) as bar:
                for index in plan.pending():
                    bar.update(job.write_shard(plan, index))
        finally:
            if embed.backend == "vllm" and _encoder.cache_info().currsize:  # return the engine's memory
                job.encoder().close()
                _encoder.cache_clear()
    missing = plan.pending()
    if missing:
        raise RuntimeError(f"embed: shards {missing[:5]} were not produced; run again to resume")
    return _assemble(job, fingerprint["adapter_sha256"], plan, source, out_dir, counts, corpus, overwrite=overwrite)


def _assemble(job: EmbedJob, adapter_hash: str | None, plan: ShardPlan, source: Path, out_dir: Path,
              counts: dict[str, int], corpus: CorpusConfig, *, overwrite: bool) -> EmbedResult:
    dim = pl.read_parquet_schema(plan.shard_path(0))["vector"].size  # type: ignore[union-attr]
    schema = embeddings_schema(dim)
    table = pl.concat([read_parquet(plan.shard_path(i), schema) for i in range(plan.n_shards)])
    config = {"model": job.model, "adapter": job.adapter, "adapter_sha256": adapter_hash,
              "embed": job.embed.to_dict(), "corpus": corpus.to_dict(), "normalize": job.normalize, "dim": dim}
    counts = {**counts, "shards": plan.n_shards, "dim": dim}
    write_dataset(out_dir, table, kind="embeddings", schema=schema, config=config, source=str(source),
                  counts=counts, drops={"empty": counts["empty"], "duplicate": counts["duplicates"]},
                  parents={"source_sha256": file_sha256(source)}, overwrite=overwrite,
                  description=f"PromptEOL embeddings of {source.name} from {job.model}"
                  + (f" with the adapter {job.adapter}" if job.adapter else "")
                  + (" (L2-normalised)" if job.normalize else "") + ": one row per distinct text.")
    shutil.rmtree(plan.work_dir, ignore_errors=True)
    log.info("embed: %s distinct texts of %s rows (%s-dimensional) in %s", f"{counts['distinct']:,}",
             f"{counts['rows']:,}", dim, out_dir)
    return EmbedResult(out_dir, counts)


def read_embeddings(path: Path | str) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The table of an embeddings dataset folder (checked against its manifest's dimension) and its manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("kind") != "embeddings":
        raise ValueError(f"{path}: not an embeddings dataset (kind {manifest.get('kind')!r}); make one with "
                         "sempa embed")
    return read_parquet(resolve_dataset_file(path), embeddings_schema(int(manifest["config"]["dim"]))), manifest


def search(index: Path | str, query: str, k: int = 5, *, encoder: Any = None) -> pl.DataFrame:
    """The ``k`` texts of the embeddings dataset ``index`` closest to ``query`` by exact cosine similarity
    (``rank``, ``score``, ``id``, ``text``). The query is embedded as the index was (model, adapter, settings of
    its manifest) unless ``encoder`` is given."""
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    table, manifest = read_embeddings(index)
    if encoder is None:
        config = manifest["config"]
        adapter = config.get("adapter")
        if adapter is not None and adapter_sha256_or_none(adapter) != config.get("adapter_sha256"):
            raise ValueError(f"{index}: the adapter {adapter} it was embedded with is missing or has changed; "
                             "embed the corpus again")
        encoder = EmbedJob(config["model"], adapter, EmbedConfig.from_dict(config["embed"]), False).encoder()
    vectors = table["vector"].to_numpy().astype(np.float32, copy=False)
    query_vector = encoder.encode([query])[0].astype(np.float32)
    norms = np.clip(np.linalg.norm(vectors, axis=1), 1e-12, None) * max(float(np.linalg.norm(query_vector)), 1e-12)
    scores = vectors @ query_vector / norms
    top = np.argsort(-scores, kind="stable")[:k]
    return pl.DataFrame({"rank": np.arange(1, len(top) + 1), "score": scores[top].astype(np.float64),
                         "id": table["id"].gather(top), "text": table["text"].gather(top)})


def adapter_sha256_or_none(adapter: str | Path) -> str | None:
    """The hash of an adapter's weights, or None when the folder is gone."""
    try:
        return adapter_sha256(adapter)
    except FileNotFoundError:
        return None
