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
from pathlib import Path
from typing import Any

from sempa_train.config import EmbedConfig, EvalConfig, GateConfig, RetentionConfig
from sempa_train.evaluation import format_table, run_sts_eval
from sempa_train.io import code_version, now_iso, write_json
from sempa_train.sts_data import STSSubset, load_tasks

log = logging.getLogger(__name__)

class GateError(RuntimeError):
    """A tuned model crossed a quality gate."""


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
    from sempa_train.report import build_report
    from sempa_train.retention import SIMILARITY_ENCODER, compare, run_retention

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
        from sempa_train.embedding import load_encoder

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
