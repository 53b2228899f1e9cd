"""The visual report of an evaluation folder, rebuilt from saved outputs only (``sempa report DIR``).

Reads ``DIR/summary.json`` (written by the evaluation stage) and the files it points to, and writes
``DIR/report.md`` with these plots beside it:

* ``sts_bars.png`` — Spearman per STS task, base against tuned;
* ``stsb_scatter.png`` — predicted cosine against gold score on STS-B (base and tuned);
* ``training.png`` — DPO reward margin, reward accuracy and the chosen/rejected log-prob change against the
  reference per logged step (when a train log is known);
* ``checkpoints.png`` — probed STS-B subset, perplexity ratio and paraphrase-similarity change against
  steps, the gates and the selected checkpoint (when training probed checkpoints: ``checkpoints.jsonl``
  beside the train log);
* ``scores.png`` — chosen and rejected score distributions of the training data (when scored).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from sempa_train.core.io import read_json, resolve_dataset_file, write_text
from sempa_train.stages.evaluation import predictions_path, read_predictions


def agg_pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (plots are written, never shown; no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sts_bars(base: dict[str, Any], tuned: dict[str, Any] | None, path: Path) -> None:
    plt = agg_pyplot()
    tasks = list(base["tasks"])
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(tasks) + 2), 3.5))
    width = 0.38 if tuned else 0.6
    xs = range(len(tasks))
    ax.bar([x - (width / 2 if tuned else 0) for x in xs], [base["tasks"][t]["spearman"] for t in tasks], width,
           label="base (PromptEOL)")
    if tuned:
        ax.bar([x + width / 2 for x in xs], [tuned["tasks"][t]["spearman"] for t in tasks], width, label="tuned")
    ax.set_xticks(list(xs), tasks, rotation=20)
    ax.set_ylabel("Spearman x 100")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right")
    ax.set_title("STS, base against tuned")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scatter(predictions: dict[str, pl.DataFrame], task: str, path: Path) -> bool:
    plt = agg_pyplot()
    frames = {name: df.filter(pl.col("task") == task) for name, df in predictions.items()}
    frames = {name: df for name, df in frames.items() if df.height}
    if not frames:
        return False
    fig, axes = plt.subplots(1, len(frames), figsize=(4.2 * len(frames), 3.8), squeeze=False)
    for ax, (name, df) in zip(axes[0], frames.items(), strict=True):
        ax.scatter(df["gold"], df["cosine"], s=5, alpha=0.35)
        ax.set_xlabel("gold score")
        ax.set_ylabel("cosine similarity")
        ax.set_title(f"{task} — {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_training(log_file: Path, path: Path) -> bool:
    """Reward margin, reward accuracy, and the change of the chosen and rejected answers' log-probability against
    the reference (TRL's ``rewards/*`` are beta x that change): a chosen curve that falls below zero is the early
    warning that DPO is lowering the likelihood of good answers too ("likelihood displacement")."""
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "rewards/margins" in r]
    if not steps:
        return False
    config_file = log_file.parent / "config.json"
    beta = json.loads(config_file.read_text()).get("beta", 1.0) if config_file.is_file() else 1.0
    plt = agg_pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.4))
    x = [r.get("step", i + 1) for i, r in enumerate(steps)]
    left.plot(x, [r["rewards/margins"] for r in steps], marker=".")
    left.set_title("reward margin (chosen - rejected)")
    middle.plot(x, [r["rewards/accuracies"] for r in steps], marker=".", color="tab:green")
    middle.set_ylim(-0.05, 1.05)
    middle.set_title("reward accuracy")
    for side, color in (("chosen", "tab:blue"), ("rejected", "tab:red")):
        if all(f"rewards/{side}" in r for r in steps):
            right.plot(x, [r[f"rewards/{side}"] / beta for r in steps], marker=".", color=color, label=side)
    right.axhline(0.0, color="grey", lw=0.8)
    right.set_title("log-prob - reference log-prob")
    right.legend()
    for ax in (left, middle, right):
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_probe_tasks(ax: Any, steps: list[dict[str, Any]]) -> None:
    """Each probe task's Spearman beside their mean, when the probe read more than one task."""
    tasks = steps[0].get("sts_tasks") or {}
    if len(tasks) < 2 or any(not r.get("sts_tasks") for r in steps):
        return
    for task in tasks:
        ax.plot([r["step"] for r in steps], [r["sts_tasks"][task] for r in steps], ls="--", lw=0.8, marker=".",
                label=task)


def plot_checkpoints(probes_file: Path, path: Path) -> bool:
    """STS probe (the mean, and each task when it read several), perplexity ratio and (when probed)
    greedy-paraphrase similarity change of every probed step (scale 1), and each probed scale of the best-STS step,
    with the selection gates; the model's ``metrics.json`` names the selected step and scale."""
    rows = [json.loads(line) for line in probes_file.read_text().splitlines() if line.strip()]
    steps = sorted((r for r in rows if r["scale"] == 1.0), key=lambda r: r["step"])
    if len(steps) < 2:
        return False
    metrics_file = probes_file.with_name("metrics.json")
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    config_file = probes_file.with_name("config.json")
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    split = config.get("eval_sts_split", "dev")
    tasks = "+".join(t.replace("Benchmark", "-B").replace("Relatedness", "") for t in
                     config.get("eval_sts_tasks", ["STSBenchmark"]))
    panels = [("sts_spearman", f"{tasks} {split} subsets (mean Spearman x 100)", None, "tab:blue"),
              ("perplexity_ratio", "held-out perplexity / base", config.get("select_max_perplexity_ratio"),
               "tab:red")]
    if any(r.get("paraphrase_delta") is not None for r in rows):
        panels.append(("paraphrase_delta", "greedy-paraphrase similarity - base",
                       config.get("select_min_paraphrase_delta"), "tab:green"))
    plt = agg_pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.4))
    x = [r["step"] for r in steps]
    for ax, (key, title, gate, color) in zip(axes, panels, strict=True):
        ax.plot(x, [r[key] for r in steps], marker="o", color=color, label=key.replace("_", " "))
        if key == "sts_spearman":
            _plot_probe_tasks(ax, steps)
        if gate is not None:
            ax.axhline(gate, color=color, ls="--", lw=0.8, label=f"gate {gate}")
        if "selected_step" in metrics:
            ax.axvline(metrics["selected_step"], color="grey", ls=":", lw=1, label="selected step")
        for r in (r for r in rows if r["scale"] != 1.0 and r.get(key) is not None):  # the best step, rescaled
            ax.plot([r["step"]], [r[key]], "k.")
            ax.annotate(f"x{r['scale']:g}", (r["step"], r[key]), fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_pareto(rows: dict[str, dict[str, Any]], task: str, gate: float | None, path: Path) -> bool:
    """Each arm's change of ``task`` Spearman against its perplexity ratio, the baseline at (1, 0), the gate as a
    vertical line: the arms up and to the left of the gate are the ones worth having."""
    arms = {arm: r for arm, r in rows.items() if arm != "baseline" and r.get("perplexity_ratio") is not None}
    if not arms or task not in rows.get("baseline", {}).get("sts", {}):
        return False
    base = rows["baseline"]["sts"][task]
    plt = agg_pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter([1.0], [0.0], color="grey", marker="s", label="baseline")
    for arm, r in arms.items():
        delta = r["sts"][task] - base
        ax.scatter([r["perplexity_ratio"]], [delta], color="tab:blue")
        if task in r.get("sts_delta_ci", {}):
            low, high = r["sts_delta_ci"][task]
            ax.plot([r["perplexity_ratio"]] * 2, [low, high], color="tab:blue", lw=0.8)
        ax.annotate(arm, (r["perplexity_ratio"], delta), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if gate is not None:
        ax.axvline(gate, color="tab:red", ls="--", lw=0.8, label=f"perplexity gate {gate}")
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_xlabel("perplexity ratio on held-out text (tuned / base)")
    ax.set_ylabel(f"Δ {task} Spearman x 100 (95% CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_scores(preferences: Path, path: Path) -> bool:
    df = pl.read_parquet(resolve_dataset_file(preferences), columns=["chosen_score", "rejected_score"])
    chosen, rejected = df["chosen_score"].drop_nulls(), df["rejected_score"].drop_nulls()
    if chosen.is_empty() and rejected.is_empty():
        return False
    plt = agg_pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.hist(chosen.to_list(), bins=30, alpha=0.6, label=f"chosen (n={chosen.len()})")
    ax.hist(rejected.to_list(), bins=30, alpha=0.6, label=f"rejected (n={rejected.len()})")
    ax.set_xlabel("scorer similarity to the premise")
    ax.set_title("training pairs: chosen vs rejected scores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _retention_table(retention: dict[str, Any]) -> list[str]:
    base, tuned = retention["base"], retention.get("tuned")
    lines = ["| metric | base | tuned |", "|---|---:|---:|",
             f"| perplexity ({base['perplexity_texts']} held-out texts) | {base['perplexity']:.2f} | "
             f"{tuned['perplexity']:.2f} |" if tuned else f"| perplexity | {base['perplexity']:.2f} | |"]
    if "paraphrase" in base:
        for key, label in (("similarity_mean", "paraphrase similarity to source"), ("copy_rate", "copy rate"),
                           ("empty_rate", "empty rate"), ("mean_words", "words per paraphrase")):
            tuned_value = f"{tuned['paraphrase'][key]:.3f}" if tuned else ""
            lines.append(f"| {label} | {base['paraphrase'][key]:.3f} | {tuned_value} |")
    if "compare" in retention:
        lines.append(f"| perplexity ratio (tuned / base) | | {retention['compare']['perplexity_ratio']:.3f} |")
    lm_eval = base.get("lm_eval", {})
    lines += ["", f"lm-eval: {lm_eval.get('skipped') or 'see retention.json'}"]
    return lines


def build_report(out_dir: Path) -> Path:
    """Write ``report.md`` and its plots from the saved outputs of an evaluation folder."""
    out_dir = Path(out_dir)
    summary = read_json(out_dir / "summary.json")
    outputs = summary.get("outputs", {})
    base = read_json(Path(outputs["eval_base"]))
    tuned = read_json(Path(outputs["eval_tuned"])) if outputs.get("eval_tuned") else None
    adapter = f" + adapter `{summary['adapter']}`" if summary.get("adapter") else ""
    lines = ["# SemPA evaluation report", "", f"- model: `{summary['model']}`{adapter}",
             f"- created: {summary.get('created_at')} by sempa {summary.get('code_version')}", ""]
    gates = summary.get("gates", {})
    if gates.get("failures"):
        lines += ["**Quality gates failed:** " + "; ".join(gates["failures"]), ""]
    elif any(v is not None for v in gates.get("config", {}).values()):
        lines += ["Quality gates passed.", ""]
    lines += ["## STS (Spearman x 100 of cosine similarity)", "", "```", summary["sts"]["table"], "```", ""]
    plot_sts_bars(base, tuned, out_dir / "sts_bars.png")
    lines += ["![STS per task](sts_bars.png)", ""]
    predictions = {name: read_predictions(Path(outputs[key]))
                   for name, key in (("base", "eval_base"), ("tuned", "eval_tuned"))
                   if outputs.get(key) and predictions_path(Path(outputs[key])).is_file()}
    if plot_scatter(predictions, "STSBenchmark", out_dir / "stsb_scatter.png"):
        lines += ["![STS-B predicted vs gold](stsb_scatter.png)", ""]
    if "retention" in summary:
        lines += ["## Generation retention", "", *_retention_table(summary["retention"]), ""]
        examples = summary["retention"].get("tuned", summary["retention"]["base"]).get("paraphrase", {}).get("examples")
        if examples:
            lines += ["Greedy paraphrases of the tuned model:", ""]
            lines += [f"- {e['source']} → {e['paraphrase'] or '(empty)'}" for e in examples[:3]] + [""]
    train_log = outputs.get("train_log")
    if train_log and Path(train_log).is_file() and plot_training(Path(train_log), out_dir / "training.png"):
        lines += ["## Training", "", "![reward margin, accuracy, log-prob change against the reference](training.png)",
                  ""]
        probes = Path(train_log).with_name("checkpoints.jsonl")
        if probes.is_file() and plot_checkpoints(probes, out_dir / "checkpoints.png"):
            lines += ["![STS and perplexity ratio of the probed checkpoints](checkpoints.png)", ""]
    preferences = outputs.get("preferences")
    if preferences and Path(preferences).exists():
        if plot_scores(Path(preferences), out_dir / "scores.png"):
            lines += ["## Training data", "", "![chosen and rejected scores](scores.png)", ""]
        else:
            lines += ["## Training data", "", "No chosen/rejected scores: the pairs were not scored (gold strategy).",
                      ""]
    lines += ["## Files", "", *[f"- {k}: `{v}`" for k, v in outputs.items()], ""]
    path = out_dir / "report.md"
    write_text(path, "\n".join(lines))
    return path
