"""Compare preference strategies under the same training budget: ``sempa experiment CONFIG.yaml``.

The config has a run config's sections (``prepare``, ``sample``, ``rank``, ``train``, ``eval``,
``embed``, ``retention``, ``gates``) shared by every arm, plus ``name``, ``out`` and ``strategies``:
a mapping from arm name to section overrides (usually ``rank: {strategy: ...}``). The data are
prepared and sampled once; each arm ranks, trains (same ``max_steps``) and is evaluated against
the same untuned baseline. Every step's output is kept under ``out`` and reused when the experiment
is started again, so a long run that stops resumes where it stopped. Results go to
``out/results.json``, ``out/results.md`` (the table in the README) and ``out/pareto.png`` (each
arm's STS change against its perplexity ratio, with the gate).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import yaml

from sempa_train.assessment import GateError, assess
from sempa_train.checkpoints import NoPassingCheckpointError
from sempa_train.evaluation import delta_intervals, predictions_path
from sempa_train.io import code_version, now_iso, read_json, write_json, write_text
from sempa_train.prepare import prepare
from sempa_train.ranking import rank
from sempa_train.report import plot_pareto
from sempa_train.sampling import sample_candidates
from sempa_train.train import train_dpo
from sempa_train.workflow import SECTIONS, RunConfig

log = logging.getLogger(__name__)

FAILED = "train_failed.json"  # in an arm's folder: training found no checkpoint within the selection gate


def load_experiment(path: Path) -> tuple[str, Path, RunConfig, dict[str, RunConfig]]:
    """``(name, out, shared config, {arm: config})`` from an experiment YAML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment config {path} does not exist")
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    name, out, arms = values.pop("name", path.stem), values.pop("out", None), values.pop("strategies", None)
    if not out or not arms:
        raise ValueError(f"{path}: an experiment needs 'out' (a folder) and 'strategies' (arm → overrides)")
    model = values.pop("model", None)
    shared = {section: values.get(section) or {} for section in SECTIONS if section in values}
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}")
    base = RunConfig.build(None, overrides=shared, model=model)
    configs = {}
    for arm, overrides in arms.items():
        merged = {section: {**shared.get(section, {}), **(overrides or {}).get(section, {})} for section in SECTIONS}
        configs[arm] = RunConfig.build(None, overrides=merged, model=model)
    return name, Path(out), base, configs


def _timed(label: str, timings: dict[str, float], fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, its seconds recorded under ``label`` even when it raises (a failed gate still
    took the evaluation's time)."""
    start = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        timings[label] = round(time.perf_counter() - start, 1)
        log.info("experiment: %s took %.0fs", label, timings[label])


def run_experiment(path: Path, *, run: bool = True) -> dict[str, Any]:
    """Run (or resume) every arm of the experiment at ``path`` and write the results table.

    ``run=False`` runs nothing: it writes the table of the arms already evaluated (of a run that
    was stopped, say) and lists the others under ``missing``."""
    name, out, base, arms = load_experiment(path)
    if not run:
        return _write_results(name, out, base, arms, {}, 0.0)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    data = out / "data"
    if not (data / "triples").exists():
        _timed("prepare", timings, prepare, base.prepare, data, overwrite=True)
    needs_candidates = any(cfg.rank.strategy != "gold" for cfg in arms.values())
    candidates = out / "candidates"
    if needs_candidates and not candidates.exists():
        _timed("sample", timings, sample_candidates, base.sample, data / "triples", candidates)
    if not _evaluated(out, "baseline"):
        _timed("evaluate baseline", timings, assess, base.train.model, None, _eval_dir(out, "baseline"),
               eval_cfg=base.eval, embed=base.embed, retention=base.retention)
    for arm, cfg in arms.items():
        arm_dir = out / arm
        if not (arm_dir / "preferences").exists():
            _timed(f"{arm}: rank", timings, rank, cfg.rank, arm_dir / "preferences", triples=data / "triples",
                   candidates=candidates if cfg.rank.strategy != "gold" else None)
        if (arm_dir / FAILED).is_file():  # no checkpoint passed the selection gate in an earlier invocation
            continue
        if not (arm_dir / "model").exists():
            try:
                _timed(f"{arm}: train", timings, train_dpo, cfg.train, arm_dir / "preferences", arm_dir / "model")
            except NoPassingCheckpointError as e:  # recorded; the other arms still run
                log.warning("experiment: %s: %s", arm, e)
                write_json(arm_dir / FAILED, {"error": str(e)})
                continue
        if not _evaluated(out, arm):
            try:
                _timed(f"{arm}: evaluate", timings, assess, cfg.train.model, arm_dir / "model" / "adapter",
                       _eval_dir(out, arm), eval_cfg=cfg.eval, embed=cfg.embed, retention=cfg.retention,
                       gates=cfg.gates, inputs={"preferences": str(arm_dir / "preferences"),
                                                "train_log": str(arm_dir / "model" / "train_log.jsonl")})
            except GateError as e:  # recorded in the arm's summary and the table; the other arms still run
                log.warning("experiment: %s: %s", arm, e)
    return _write_results(name, out, base, arms, timings, time.perf_counter() - started)


def _write_results(name: str, out: Path, base: RunConfig, arms: dict[str, RunConfig], timings: dict[str, float],
                   seconds: float) -> dict[str, Any]:
    """``out/results.json`` and ``out/results.md`` from the baseline and every arm evaluated so far."""
    if not _evaluated(out, "baseline"):
        raise FileNotFoundError(f"{_eval_dir(out, 'baseline')} has no summary.json: the experiment's baseline "
                                "was not evaluated")
    done = ["baseline", *(arm for arm in arms if _evaluated(out, arm))]
    results = {
        "name": name, "created_at": now_iso(), "code_version": code_version(),
        "wall_seconds_this_invocation": round(seconds, 1), "timings": timings,
        "config": base.to_dict(), "arms": {arm: cfg.to_dict() for arm, cfg in arms.items()},
        "rows": {arm: _row(arm, read_json(_eval_dir(out, arm) / "summary.json"), out) for arm in done},
        "missing": [arm for arm in arms if arm not in done and not (out / arm / FAILED).is_file()],
        "failed": {arm: read_json(out / arm / FAILED)["error"] for arm in arms if (out / arm / FAILED).is_file()},
    }
    write_json(out / "results.json", results)
    table = results_table(results)
    task = next(iter(results["rows"]["baseline"]["sts"]))
    if plot_pareto(results["rows"], task, base.gates.max_perplexity_ratio, out / "pareto.png"):
        table += f"\n![Δ {task} against perplexity ratio, per arm](pareto.png)\n"
    write_text(out / "results.md", table)
    return results


def _eval_dir(out: Path, arm: str) -> Path:
    """Where an arm's evaluation (``summary.json``, report) lives; the untuned baseline has its own folder."""
    return out / "baseline" if arm == "baseline" else out / arm / "eval"


def _evaluated(out: Path, arm: str) -> bool:
    return (_eval_dir(out, arm) / "summary.json").is_file()


def _row(arm: str, summary: dict[str, Any], out: Path) -> dict[str, Any]:
    """The numbers of one arm: STS per task, retention, data and training facts."""
    outputs = summary["outputs"]
    tuned = read_json(Path(outputs["eval_tuned"])) if outputs.get("eval_tuned") else read_json(
        Path(outputs["eval_base"]))
    retention = summary.get("retention", {})
    probe = retention.get("tuned") or retention.get("base") or {}
    row: dict[str, Any] = {
        "sts": {task: r["spearman"] for task, r in tuned["tasks"].items()},
        "sts_avg": tuned["avg"],
        "perplexity": probe.get("perplexity"),
        "perplexity_ratio": retention.get("compare", {}).get("perplexity_ratio", 1.0 if arm == "baseline" else None),
        "paraphrase_similarity": probe.get("paraphrase", {}).get("similarity_mean"),
        "copy_rate": probe.get("paraphrase", {}).get("copy_rate"),
        "gates": "" if arm == "baseline" else ("passed" if summary.get("gates", {}).get("passed", True) else "failed"),
    }
    evals = [Path(outputs[k]) for k in ("eval_base", "eval_tuned") if outputs.get(k)]
    if len(evals) == 2 and all(predictions_path(e).is_file() for e in evals):  # not in copies without Parquet
        row["sts_delta_ci"] = delta_intervals(*evals)
    arm_dir = out / arm
    if (arm_dir / "model" / "metrics.json").is_file():
        metrics = read_json(arm_dir / "model" / "metrics.json")
        prefs = read_json(arm_dir / "preferences" / "manifest.json")
        row.update(pairs=prefs["rows"], steps=metrics.get("global_steps"),
                   train_seconds=metrics.get("train_runtime"),
                   reward_accuracy=metrics.get("final_rewards_accuracies"))
        if "selected_step" in metrics:  # checkpoint selection: the step (and LoRA scale) the adapter is from
            row["selected"] = f"{metrics['selected_step']} x{metrics['selected_scale']:g}"
    return row


def results_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per arm, STS per task, the first task's change with its paired-bootstrap 95 %
    interval, retention, data size, training time."""
    rows = results["rows"]
    tasks = list(next(iter(rows.values()))["sts"])
    header = ["arm", *tasks, f"Δ {tasks[0]} (95% CI)", "STS avg", "Δ avg", "perplexity", "ppl ratio",
              "paraphrase sim", "copy rate", "gates", "pairs", "steps", "selected", "train s"]
    base_avg = rows["baseline"]["sts_avg"]

    def fmt(value: Any, spec: str = ".2f") -> str:
        return "" if value is None else format(value, spec)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, r in rows.items():
        delta = ""
        if arm != "baseline":
            delta = f"{r['sts'][tasks[0]] - rows['baseline']['sts'][tasks[0]]:+.2f}"
            if tasks[0] in r.get("sts_delta_ci", {}):
                low, high = r["sts_delta_ci"][tasks[0]]
                delta += f" [{low:+.2f}, {high:+.2f}]"
        cells = [arm, *[fmt(r["sts"][t]) for t in tasks], delta, fmt(r["sts_avg"]),
                 "" if arm == "baseline" else f"{r['sts_avg'] - base_avg:+.2f}", fmt(r["perplexity"], ".1f"),
                 fmt(r["perplexity_ratio"], ".3f"), fmt(r["paraphrase_similarity"], ".3f"), fmt(r["copy_rate"], ".2f"),
                 r["gates"], str(r.get("pairs", "")), str(r.get("steps", "")), r.get("selected", ""),
                 fmt(r.get("train_seconds"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("missing"):
        lines.append(f"\nNot evaluated yet: {', '.join(results['missing'])}.")
    for arm, error in results.get("failed", {}).items():
        lines.append(f"\n{arm}: {error}")
    return "\n".join(lines) + "\n"
