"""STS evaluation: Spearman x 100 of the cosine similarity against gold scores.

STS12-16 report SentEval's pooled "all" score (one correlation over all subsets of a year
concatenated) as ``spearman``, with the subset-size weighted mean (``wmean``) and per-subset scores
beside it. The primary metric is ``avg``, the mean of the tasks' ``spearman``.

Output contract (read by other tools)::

    {"model": "...", "tasks": {"STSBenchmark": {"spearman": 82.03, "n": 1379, "split": "test"}, ...},
     "avg": 82.03, "primary_metric": "avg"}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy.stats import spearmanr

from sempa_train.core.config import EmbedConfig, EvalConfig
from sempa_train.core.io import IntegrityError, file_sha256, read_json, read_parquet, write_json, write_parquet
from sempa_train.core.models import resolve_model
from sempa_train.core.result_cache import lookup, model_fingerprint, result_key, store
from sempa_train.core.schemas import PREDICTIONS_SCHEMA
from sempa_train.stages.embedding import Encoder, cosine, encoder_kind, load_encoder
from sempa_train.stages.sts_data import STSSubset, load_tasks


def spearman100(predicted: np.ndarray, gold: np.ndarray) -> float:
    """Spearman correlation x 100 (0.0 for fewer than two pairs or a constant input)."""
    if len(gold) < 2 or np.all(predicted == predicted[0]) or np.all(gold == gold[0]):
        return 0.0
    return float(spearmanr(predicted, gold).statistic * 100)


def score_subsets(encoder: Encoder, tasks: dict[str, list[STSSubset]]) -> dict[str, list[np.ndarray]]:
    """Cosine similarity of every pair, per task and subset; all sentences are encoded in one call."""
    sentences = [s for subsets in tasks.values() for sub in subsets for s in (*sub.sent1, *sub.sent2)]
    vectors = encoder.encode(sentences)
    out: dict[str, list[np.ndarray]] = {}
    offset = 0
    for task, subsets in tasks.items():
        out[task] = []
        for sub in subsets:
            n = len(sub)
            a, b = vectors[offset : offset + n], vectors[offset + n : offset + 2 * n]
            out[task].append(cosine(a, b))
            offset += 2 * n
    return out


def task_metrics(subsets: list[STSSubset], similarities: list[np.ndarray]) -> dict[str, Any]:
    """Pooled Spearman, weighted mean and per-subset Spearman of one task."""
    per_subset = {sub.name: {"spearman": spearman100(sim, sub.scores), "n": len(sub)}
                  for sub, sim in zip(subsets, similarities, strict=True)}
    n = sum(len(sub) for sub in subsets)
    pooled = spearman100(np.concatenate(similarities), np.concatenate([sub.scores for sub in subsets]))
    result: dict[str, Any] = {"spearman": pooled, "n": n, "split": subsets[0].split}
    if len(subsets) > 1:
        result["wmean"] = sum(m["spearman"] * m["n"] for m in per_subset.values()) / n
        result["subsets"] = per_subset
    return result


def evaluate_sts(encoder: Encoder, tasks: dict[str, list[STSSubset]]) -> dict[str, Any]:
    """Evaluate ``encoder`` on loaded STS tasks; returns the contract dict above."""
    return summarize(encoder.name, tasks, score_subsets(encoder, tasks))


def summarize(
    name: str, tasks: dict[str, list[STSSubset]], similarities: dict[str, list[np.ndarray]]
) -> dict[str, Any]:
    """The contract dict from per-subset cosine similarities."""
    results = {task: task_metrics(tasks[task], similarities[task]) for task in tasks}
    avg = float(np.mean([r["spearman"] for r in results.values()])) if results else 0.0
    return {"model": name, "tasks": results, "avg": avg, "primary_metric": "avg"}


def predictions_table(tasks: dict[str, list[STSSubset]], similarities: dict[str, list[np.ndarray]]) -> pl.DataFrame:
    """Every scored pair with its gold score and cosine similarity (``PREDICTIONS_SCHEMA``)."""
    frames = [
        pl.DataFrame({"task": task, "subset": sub.name, "split": sub.split, "sentence1": sub.sent1,
                      "sentence2": sub.sent2, "gold": sub.scores, "cosine": sim.astype(np.float64)},
                     schema=PREDICTIONS_SCHEMA)
        for task, subsets in tasks.items() for sub, sim in zip(subsets, similarities[task], strict=True)
    ]
    return pl.concat(frames) if frames else pl.DataFrame(schema=PREDICTIONS_SCHEMA)


def paired_bootstrap(gold: np.ndarray, base: np.ndarray, tuned: np.ndarray, *, samples: int = 1000,
                     seed: int = 0) -> tuple[float, float]:
    """95 % interval of ``spearman(tuned) - spearman(base)`` (x100) over pairs resampled with replacement,
    the same resample for both models: tells a real change from the sampling noise of one dev set."""
    if not len(gold) == len(base) == len(tuned):
        raise ValueError(f"paired bootstrap needs equal lengths, got {len(gold)}, {len(base)}, {len(tuned)}")
    rng = np.random.default_rng(seed)
    deltas = np.empty(samples)
    for i in range(samples):
        idx = rng.integers(0, len(gold), len(gold))
        deltas[i] = spearman100(tuned[idx], gold[idx]) - spearman100(base[idx], gold[idx])
    low, high = np.percentile(deltas, [2.5, 97.5])
    return float(low), float(high)


def delta_intervals(base_json: Path, tuned_json: Path) -> dict[str, tuple[float, float]]:
    """Per task, the paired-bootstrap interval of the Spearman change between two evaluations of the same pairs."""
    base, tuned = read_predictions(base_json), read_predictions(tuned_json)
    same = ["task", "subset", "sentence1", "sentence2", "gold"]
    if base.height != tuned.height or not base.select(same).equals(tuned.select(same)):
        raise ValueError(f"{predictions_path(base_json)} and {predictions_path(tuned_json)} score different pairs")
    intervals = {}
    for (task,), rows in base.with_columns(tuned_cosine=tuned["cosine"]).group_by("task", maintain_order=True):
        intervals[task] = paired_bootstrap(rows["gold"].to_numpy(), rows["cosine"].to_numpy(),
                                           rows["tuned_cosine"].to_numpy())
    return intervals


def predictions_path(results_json: Path) -> Path:
    """Where ``run_sts_eval`` writes the per-pair predictions beside its JSON."""
    return Path(results_json).with_suffix(".predictions.parquet")


def write_results(results_json: Path, results: dict[str, Any], predictions: pl.DataFrame) -> None:
    """Write an evaluation's predictions, then its JSON naming their hash: the JSON is the one commit point, so a
    crash between the two writes leaves the old JSON, which no longer matches the new predictions (refused on
    read) rather than a silent mix of two evaluations."""
    path = predictions_path(results_json)
    write_parquet(predictions, path, PREDICTIONS_SCHEMA)
    write_json(results_json, {**results, "predictions_sha256": file_sha256(path)})


def read_predictions(results_json: Path) -> pl.DataFrame:
    """The per-pair predictions of an evaluation, checked against the hash its JSON records (``IntegrityError``)."""
    path = predictions_path(results_json)
    recorded = read_json(results_json).get("predictions_sha256")
    if recorded is not None and file_sha256(path) != recorded:
        raise IntegrityError(f"{path} does not belong to {Path(results_json).name} (its sha256 differs from the "
                             "one recorded there): the evaluation was interrupted or the files were mixed; run it "
                             "again")
    return read_parquet(path, PREDICTIONS_SCHEMA)


def format_table(results: dict[str, Any], *, compare: dict[str, Any] | None = None) -> str:
    """A plain-text table of one result (and, with ``compare``, a baseline column and the delta)."""
    header = ["task", "split", "n", "spearman"]
    if compare:
        header = ["task", "split", "n", "baseline", "spearman", "delta"]
    rows = []
    for task, r in results["tasks"].items():
        row = [task, r["split"], str(r["n"])]
        if compare:
            base = compare["tasks"].get(task, {}).get("spearman", float("nan"))
            row += [f"{base:.2f}", f"{r['spearman']:.2f}", f"{r['spearman'] - base:+.2f}"]
        else:
            row.append(f"{r['spearman']:.2f}")
        rows.append(row)
    avg_row = ["avg", "", ""]
    if compare:
        avg_row += [f"{compare['avg']:.2f}", f"{results['avg']:.2f}", f"{results['avg'] - compare['avg']:+.2f}"]
    else:
        avg_row.append(f"{results['avg']:.2f}")
    rows.append(avg_row)
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def tasks_sha256(tasks: dict[str, list[STSSubset]]) -> str:
    """Content hash of loaded STS data (sentences and gold scores), whatever folder they came from."""
    digest = hashlib.sha256()
    for task, subsets in tasks.items():
        for sub in subsets:
            digest.update(json.dumps([task, sub.name, sub.split, sub.sent1, sub.sent2]).encode())
            digest.update(np.asarray(sub.scores, dtype=np.float64).tobytes())
    return digest.hexdigest()


def sts_cache_key(model: str | Path, cfg: EvalConfig, embed: EmbedConfig, tasks: dict[str, list[STSSubset]]) -> str:
    """Key of an untuned model's STS result: its weights, the tasks and split, the embedding config (and under
    ``quantize="int8"`` the int8 scheme's version, the kernel and the weights' levels, which round differently),
    the data."""
    from sempa_train.stages import int8_kernels
    from sempa_train.stages.quantize import INT8_VERSION

    int8: dict[str, object] = {}  # keys without int8 stay as they were
    if embed.quantize == "int8":
        kernel = int8_kernels.chosen()
        int8 = {"int8": INT8_VERSION, "int8_kernel": kernel, "int8_weight_levels": int8_kernels.weight_levels(kernel)}
    return result_key("sts", {"model": model_fingerprint(model), "tasks": list(cfg.tasks), "split": cfg.split,
                              "embed": embed.to_dict(), "data": tasks_sha256(tasks), **int8})


def run_sts_eval(
    model: str,
    cfg: EvalConfig,
    embed: EmbedConfig | None = None,
    *,
    adapter: str | Path | None = None,
    out: Path | None = None,
    tasks: dict[str, list[STSSubset]] | None = None,
) -> dict[str, Any]:
    """Load the STS data (unless given) and the encoder, evaluate, and write ``out`` (JSON) when given.

    Without an adapter and with ``cfg.cache_base``, the result comes from (or goes to) the result cache."""
    embed = embed or EmbedConfig()
    tasks = tasks if tasks is not None else load_tasks(cfg.tasks, cfg.split, cfg.senteval_dir)
    info = {"model": str(model), "adapter": None if adapter is None else str(adapter),
            "embedding": encoder_kind(resolve_model(model), embed.embedding),
            "eval_config": cfg.to_dict(), "embed_config": embed.to_dict()}
    key = sts_cache_key(model, cfg, embed, tasks) if cfg.cache_base and adapter is None else None
    entry = lookup("sts", key) if key else None
    if entry is not None:
        predictions = read_predictions(entry / "results.json")
        results = {**read_json(entry / "results.json"), **info}
        results.pop("predictions_sha256", None)
    else:
        encoder = load_encoder(model, embed, adapter=adapter)
        similarities = score_subsets(encoder, tasks)
        results = {**summarize(encoder.name, tasks, similarities), **info}
        predictions = predictions_table(tasks, similarities)

    if key and entry is None:
        store("sts", key, lambda folder: write_results(folder / "results.json", results, predictions))
    if out is not None:
        write_results(Path(out), results, predictions)
    return results
