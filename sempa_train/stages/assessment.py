"""The evaluation stage: STS for base and tuned model, generation retention, quality gates, report.

``assess`` writes into ``out_dir``::

    base.json, tuned.json                 STS results (the ``sempa eval`` contract) + .predictions.parquet
    retention.json                        perplexity / paraphrase / lm-eval probes, base and tuned
    summary.json                          STS and retention side by side, gate results, input paths
    report.md + *.png                     the visual report (``sempa report DIR`` rebuilds it)

Quality gates (``GateConfig``) fail the stage with a message naming the metric, the threshold and
the value, after everything above is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sempa_train.core.config import EmbedConfig, EvalConfig, GateConfig, RetentionConfig
from sempa_train.core.io import code_version, now_iso, read_json, write_json
from sempa_train.stages.evaluation import delta_intervals, format_table, predictions_path, run_sts_eval
from sempa_train.stages.sts_data import STSSubset, load_tasks

log = logging.getLogger(__name__)

class GateError(RuntimeError):
    """A tuned model crossed a quality gate."""


@dataclass(frozen=True)
class Evaluation:
    """An evaluate stage's folder read back as typed fields: what tables, runners and reports use instead of
    looking up paths in ``summary.json``. Without an adapter the "tuned" fields describe the base model."""

    folder: Path
    model: str
    adapter: str | None
    sts: dict[str, float]  # Spearman x 100 per task, of the evaluated model
    sts_base: dict[str, float]
    split: str  # the STS split both were scored on ("?" when the folder does not say)
    perplexity: float | None
    perplexity_ratio: float | None  # tuned / base; 1.0 for the base model
    paraphrase_similarity: float | None
    paraphrase_similarity_delta: float | None
    copy_rate: float | None
    gates_passed: bool
    gate_failures: tuple[str, ...]

    PRIMARY = "sts_avg"  # the metric an experiment ranks by

    @classmethod
    def load(cls, folder: Path) -> Evaluation:
        folder = Path(folder)
        summary = read_json(folder / "summary.json")
        base = read_json(folder / "base.json")
        tuned = read_json(folder / "tuned.json") if summary.get("adapter") else base
        retention = summary.get("retention") or {}
        probe = retention.get("tuned") or retention.get("base") or {}
        compare = retention.get("compare") or {}
        gates = summary.get("gates", {})
        return cls(
            folder=folder, model=summary["model"], adapter=summary.get("adapter"),
            sts={task: r["spearman"] for task, r in tuned["tasks"].items()},
            sts_base={task: r["spearman"] for task, r in base["tasks"].items()},
            split=str(base.get("eval_config", {}).get("split", "?")),
            perplexity=probe.get("perplexity"),
            perplexity_ratio=compare.get("perplexity_ratio", 1.0 if probe and not summary.get("adapter") else None),
            paraphrase_similarity=probe.get("paraphrase", {}).get("similarity_mean"),
            paraphrase_similarity_delta=compare.get("paraphrase_similarity_mean_delta"),
            copy_rate=probe.get("paraphrase", {}).get("copy_rate"),
            gates_passed=bool(gates.get("passed", True)), gate_failures=tuple(gates.get("failures", ())),
        )

    @property
    def sts_avg(self) -> float:
        return sum(self.sts.values()) / len(self.sts)

    @property
    def sts_base_avg(self) -> float:
        return sum(self.sts_base.values()) / len(self.sts_base)

    def delta_intervals(self) -> dict[str, tuple[float, float]] | None:
        """Paired-bootstrap 95 % intervals of the per-task change (None without an adapter or predictions)."""
        files = [self.folder / "base.json", self.folder / "tuned.json"]
        if not self.adapter or not all(predictions_path(f).is_file() for f in files):
            return None
        return delta_intervals(*files)

    def metrics(self) -> dict[str, float]:
        """Flat metrics (``sts/<task>``, ``sts_avg``, ``sts_avg_delta``, retention), ``PRIMARY`` among them."""
        out = {f"sts/{task}": value for task, value in self.sts.items()}
        out.update(sts_avg=self.sts_avg, sts_avg_delta=self.sts_avg - self.sts_base_avg)
        for name in ("perplexity", "perplexity_ratio", "paraphrase_similarity", "paraphrase_similarity_delta",
                     "copy_rate"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


def gate_failures(summary: dict[str, Any], gates: GateConfig) -> list[str]:
    """One message per gate the summary fails (metric, threshold, value)."""
    failures = []
    sts_delta = summary.get("sts", {}).get("delta")
    if gates.min_sts_delta is not None and sts_delta is not None and sts_delta < gates.min_sts_delta:
        failures.append(f"sts_avg_delta = {sts_delta:+.2f} is below the minimum {gates.min_sts_delta:+.2f}")
    compare = summary.get("retention", {}).get("compare", {})
    ratio = compare.get("perplexity_ratio")
    if gates.max_perplexity_ratio is not None and ratio is not None and ratio > gates.max_perplexity_ratio:
        failures.append(f"perplexity_ratio = {ratio:.3f} is above the maximum {gates.max_perplexity_ratio:.3f}")
    sim = compare.get("paraphrase_similarity_mean_delta")
    if gates.min_paraphrase_similarity_delta is not None and sim is not None \
            and sim < gates.min_paraphrase_similarity_delta:
        failures.append(f"paraphrase_similarity_delta = {sim:+.3f} is below the minimum "
                        f"{gates.min_paraphrase_similarity_delta:+.3f}")
    return failures


def assess(
    model: str,
    adapter: str | Path | None,
    out_dir: Path,
    *,
    eval_cfg: EvalConfig,
    embed: EmbedConfig | None = None,
    retention: RetentionConfig | None = None,
    gates: GateConfig | None = None,
    inputs: dict[str, str] | None = None,
    tasks: dict[str, list[STSSubset]] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (and ``model`` + ``adapter``), write the files above, enforce the gates."""
    from sempa_train.stages.report import build_report
    from sempa_train.stages.retention import SIMILARITY_ENCODER, compare, run_retention

    out_dir = Path(out_dir)
    embed = embed or EmbedConfig()
    gates = gates or GateConfig()
    tasks = tasks if tasks is not None else load_tasks(eval_cfg.tasks, eval_cfg.split, eval_cfg.senteval_dir)
    base = run_sts_eval(model, eval_cfg, embed, out=out_dir / "base.json", tasks=tasks)
    tuned = run_sts_eval(model, eval_cfg, embed, adapter=adapter, out=out_dir / "tuned.json", tasks=tasks) \
        if adapter else None
    summary: dict[str, Any] = {
        "created_at": now_iso(), "code_version": code_version(), "model": model,
        "adapter": str(adapter) if adapter else None,
        "sts": {"base": base["avg"], "tuned": tuned["avg"] if tuned else None,
                "delta": tuned["avg"] - base["avg"] if tuned else None,
                "table": format_table(tuned, compare=base) if tuned else format_table(base)},
        "outputs": {"eval_base": str(out_dir / "base.json"), **({"eval_tuned": str(out_dir / "tuned.json")}
                                                                 if tuned else {}), **(inputs or {})},
    }
    if retention is not None:
        from sempa_train.stages.embedding import load_encoder

        encoder = load_encoder(SIMILARITY_ENCODER, show_progress=False)
        probes = {"base": run_retention(model, None, retention, encoder, cache=eval_cfg.cache_base)}
        if adapter:
            probes["tuned"] = run_retention(model, adapter, retention, encoder)
            probes["compare"] = compare(probes["base"], probes["tuned"])
        write_json(out_dir / "retention.json", probes)
        summary["retention"] = probes
        summary["outputs"]["retention"] = str(out_dir / "retention.json")
    failures = gate_failures(summary, gates)
    summary["gates"] = {"config": gates.to_dict(), "failures": failures, "passed": not failures}
    write_json(out_dir / "summary.json", summary)
    build_report(out_dir)
    if failures:
        raise GateError("quality gate failed: " + "; ".join(failures) + f" (report: {out_dir / 'report.md'})")
    return summary
