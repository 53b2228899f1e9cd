"""Compare arms under the same budget: ``sempa experiment CONFIG.yaml``, a runner of the one stage plan.

The config has a run config's sections (``prepare``, ``sample``, ``rank``, ``train``, ``eval``,
``embed``, ``retention``, ``gates``; or ``config``: a run config file that holds them, the file's own
sections overriding it) shared by every arm, plus ``name``, ``out``, ``model`` and the
arms: ``strategies`` (arm name → section overrides) and/or ``grid`` (``SECTION.FIELD`` → list of
values; one arm per combination). Each arm is the plan (``sempa_train.plan``)
run with its own config in one store under ``out``; stages whose content keys are equal across arms
(preparation, sampling, an untuned baseline) run once, and every finished stage is reused when the
experiment is started again, so a long run that stops resumes where it stopped. The baseline is the
plan's evaluate stage without an adapter. Results go to ``out/results.json``, ``out/results.md`` (the
table in the README) and ``out/pareto.png`` (each arm's STS change against its perplexity ratio, with
the gate); ``out/<arm>/`` (and ``out/baseline/eval``) link to the arm's stage folders.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sempa_train.core.errors import RecordedFailure
from sempa_train.core.io import code_version, now_iso, read_config_file, read_json, write_json, write_text
from sempa_train.core.store import Store
from sempa_train.plan import (
    SECTIONS,
    STAGE_NAMES,
    Execution,
    RunConfig,
    Runner,
    execute,
    link_outputs,
    merge_sections,
    run_step,
)
from sempa_train.stages.assessment import Evaluation, GateError
from sempa_train.stages.report import plot_pareto

log = logging.getLogger(__name__)


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Arms from a grid: ``{"train.loss_type": [sigmoid, apo_zero], "train.learning_rate": [1e-4, 3e-4]}`` →
    one arm per combination, named ``loss_type=sigmoid,learning_rate=0.0001``, as section overrides."""
    for key, values in grid.items():
        if key.count(".") != 1 or key.split(".")[0] not in SECTIONS:
            raise ValueError(f"grid key {key!r} must be SECTION.FIELD with a section of {', '.join(SECTIONS)}")
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid key {key!r} needs a non-empty list of values")
    arms: dict[str, dict[str, dict[str, Any]]] = {}
    if not grid:
        return arms
    for combination in itertools.product(*grid.values()):
        name = ",".join(f"{key.split('.')[1]}={value}" for key, value in zip(grid, combination, strict=True))
        overrides: dict[str, dict[str, Any]] = {}
        for key, value in zip(grid, combination, strict=True):
            section, field = key.split(".")
            overrides.setdefault(section, {})[field] = value
        arms[name] = overrides
    return arms


def load_experiment(path: Path) -> tuple[str, Path, RunConfig, dict[str, RunConfig]]:
    """``(name, out, shared config, {arm: config})`` from an experiment YAML file."""
    path = Path(path)
    values = read_config_file(path, "an experiment config must be a mapping of sections")
    if "config" in values:  # a run config file holds the shared sections; the experiment's own sections override
        shared = read_config_file(values.pop("config"), "a run config must be a mapping of sections")
        values = {**values, **{k: v for k, v in merge_sections(shared, values).items() if v}}
    name, out, arms = values.pop("name", path.stem), values.pop("out", None), dict(values.pop("strategies", None) or {})
    try:
        for arm, overrides in expand_grid(values.pop("grid", None) or {}).items():
            arms.setdefault(arm, overrides)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    if not out or not arms:
        raise ValueError(f"{path}: an experiment needs 'out' (a folder) and arms: 'strategies' (arm → overrides) "
                         "and/or 'grid' (SECTION.FIELD → list of values)")
    if "baseline" in arms:
        raise ValueError(f"{path}: 'baseline' names the untuned model's row; call the arm something else")
    model = values.pop("model", None)
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}")
    try:
        base = RunConfig.build(None, overrides=values, model=model)
        configs = {arm: RunConfig.build(None, overrides=merge_sections(values, overrides or {}), model=model)
                   for arm, overrides in arms.items()}
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return name, Path(out), base, configs


def run_experiment(path: Path, *, run: bool = True, runner: Runner = run_step) -> dict[str, Any]:
    """Run (or resume) every arm of the experiment at ``path`` and write the results table.

    ``run=False`` runs nothing: it writes the table of the arms already evaluated (of a run that
    was stopped, say) and lists the others under ``missing``."""
    name, out, base, arms = load_experiment(path)
    store = Store(out)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    runs: dict[str, Execution] = {}
    failed: dict[str, str] = {}
    for arm, cfg in {"baseline": base, **arms}.items():
        stages = ("evaluate",) if arm == "baseline" else STAGE_NAMES
        runs[arm] = Execution()
        try:
            execute(cfg, store, stages=stages, run=run, record=runs[arm], runner=runner)
        except RecordedFailure as e:  # recorded beside the stage's folder; the other arms still run
            log.warning("experiment: %s: %s", arm, e)
            failed[arm] = str(e)
        except GateError as e:  # written to the arm's summary and shown in the table; the other arms still run
            log.warning("experiment: %s: %s", arm, e)
        timings.update({f"{arm}: {stage}": seconds for stage, seconds in runs[arm].seconds.items()
                        if not runs[arm].reused[stage]})
        link_outputs(runs[arm], out / arm)
    return _write_results(name, out, base, arms, runs, failed, timings, time.perf_counter() - started)


def _write_results(name: str, out: Path, base: RunConfig, arms: dict[str, RunConfig], runs: dict[str, Execution],
                   failed: dict[str, str], timings: dict[str, float], seconds: float) -> dict[str, Any]:
    """``out/results.json`` and ``out/results.md`` from the baseline and every arm evaluated so far."""
    def evaluation(arm: str) -> Path | None:
        step = runs[arm].steps.get("evaluate")
        return step.out if step is not None and step.done else None

    if evaluation("baseline") is None:
        raise FileNotFoundError(f"{out}: the experiment's baseline was not evaluated yet")
    done = ["baseline", *(arm for arm in arms if evaluation(arm) is not None)]
    results = {
        "name": name, "created_at": now_iso(), "code_version": code_version(),
        "wall_seconds_this_invocation": round(seconds, 1), "timings": timings,
        "config": base.to_dict(), "arms": {arm: cfg.to_dict() for arm, cfg in arms.items()},
        "rows": {arm: _row(arm, Evaluation.load(evaluation(arm)), runs[arm]) for arm in done},
        "missing": [arm for arm in arms if arm not in done and arm not in failed],
        "failed": failed,
    }
    write_json(out / "results.json", results)
    table = results_table(results)
    task = next(iter(results["rows"]["baseline"]["sts"]))
    if plot_pareto(results["rows"], task, base.gates.max_perplexity_ratio, out / "pareto.png"):
        table += f"\n![Δ {task} against perplexity ratio, per arm](pareto.png)\n"
    write_text(out / "results.md", table)
    return results


def _row(arm: str, evaluation: Evaluation, run: Execution) -> dict[str, Any]:
    """The numbers of one arm: STS per task, retention, data and training facts."""
    row: dict[str, Any] = {
        "sts": evaluation.sts, "sts_avg": evaluation.sts_avg, "perplexity": evaluation.perplexity,
        "perplexity_ratio": evaluation.perplexity_ratio, "paraphrase_similarity": evaluation.paraphrase_similarity,
        "copy_rate": evaluation.copy_rate,
        "gates": "" if arm == "baseline" else ("passed" if evaluation.gates_passed else "failed"),
    }
    intervals = evaluation.delta_intervals()
    if intervals is not None:  # not in copies without the Parquet predictions
        row["sts_delta_ci"] = intervals
    model = run.artifacts.get("model")
    if model is not None and (model / "metrics.json").is_file():
        metrics = read_json(model / "metrics.json")
        prefs = read_json(run.artifacts["preferences"] / "manifest.json")
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
