"""The paper's whole method in one process: prepare → train → evaluate (base and tuned, with retention).

This is the single-machine path behind ``sempa run``; the Prefect flows in ``pipelines/`` run the
same stage functions as separate tasks. Output::

    OUT/data/triples, OUT/data/preferences   prepare
    OUT/model/                               train (adapter, logs, manifest)
    OUT/eval/                                STS base/tuned, retention, gates, report.md + plots
    OUT/summary.json                         what ran, where everything is, base vs tuned
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from sempa_train.assessment import assess
from sempa_train.config import (
    ClusterConfig,
    EmbedConfig,
    EvalConfig,
    GateConfig,
    PrepareConfig,
    RankConfig,
    RetentionConfig,
    SampleConfig,
    TrainConfig,
)
from sempa_train.io import code_version, now_iso, write_json
from sempa_train.prepare import prepare
from sempa_train.sts_data import load_tasks
from sempa_train.train import train_dpo

log = logging.getLogger(__name__)


SECTIONS = ("prepare", "sample", "rank", "train", "eval", "embed", "retention", "gates", "cluster")


@dataclass(frozen=True)
class RunConfig:
    """The configs of every stage of a run; a YAML file has one section per stage
    (``prepare``, ``sample``, ``rank``, ``train`` — which may name a ``preset`` —, ``eval``, ``embed``)."""

    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig.preset("cpu"))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(tasks=("STSBenchmark",), split="dev"))
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @classmethod
    def build(
        cls,
        config_file: Path | str | None = None,
        *,
        preset: str | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        model: str | None = None,
    ) -> RunConfig:
        """Defaults, then the YAML file, then the train ``preset``, then per-section ``overrides``;
        ``model`` sets the policy everywhere (train, sample, and the policy scorer)."""
        values: dict[str, Any] = {}
        where = "overrides"
        if config_file is not None:
            path = Path(config_file)
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} does not exist")
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            if not isinstance(values, dict):
                raise ValueError(f"{path}: a run config must be a mapping of sections")
            where = str(path)
        merged = {section: dict(values.get(section) or {}) for section in SECTIONS}
        unknown = sorted(set(values) - set(SECTIONS)) + sorted(set(overrides or {}) - set(SECTIONS))
        if unknown:
            raise ValueError(f"{where}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
        for section, fields in (overrides or {}).items():
            merged[section].update(fields)
        default = cls()
        train_preset = merged["train"].pop("preset", None) or preset
        if model is not None:
            merged["train"]["model"] = merged["sample"]["model"] = model
        try:
            built = cls(
                prepare=PrepareConfig.from_dict(merged["prepare"]),
                sample=SampleConfig.from_dict(merged["sample"]),
                rank=RankConfig.from_dict(merged["rank"]),
                train=TrainConfig.from_dict(merged["train"],
                                            base=TrainConfig.preset(train_preset) if train_preset else default.train),
                eval=EvalConfig.from_dict(merged["eval"], base=default.eval),
                embed=EmbedConfig.from_dict(merged["embed"]),
                retention=RetentionConfig.from_dict(merged["retention"]),
                gates=GateConfig.from_dict(merged["gates"]),
                cluster=ClusterConfig.from_dict(merged["cluster"]),
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        if model is not None and built.rank.scorer == "policy" and built.rank.scorer_model is None:
            built = replace(built, rank=built.rank.replace(scorer_model=model))
        return built

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        """Read a YAML run config (see ``build``)."""
        return cls.build(path)

    def to_dict(self) -> dict[str, Any]:
        return {section: getattr(self, section).to_dict() for section in SECTIONS}


def run_method(cfg: RunConfig, out_dir: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Run prepare (gold preferences), DPO training and the evaluation stage; return the run summary."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty; pass --overwrite or another --out")
    started = time.perf_counter()
    # Load the evaluation data first: a missing STS folder should fail before any training.
    tasks = load_tasks(cfg.eval.tasks, cfg.eval.split, cfg.eval.senteval_dir)
    prepared = prepare(cfg.prepare, out_dir / "data", overwrite=overwrite)
    trained = train_dpo(cfg.train, prepared.preferences_dir, out_dir / "model", overwrite=overwrite)
    evaluation = assess(
        cfg.train.model, trained.adapter_dir, out_dir / "eval", eval_cfg=cfg.eval, embed=cfg.embed,
        retention=cfg.retention, gates=cfg.gates, tasks=tasks,
        inputs={"preferences": str(prepared.preferences_dir), "train_log": str(trained.out_dir / "train_log.jsonl"),
                "adapter": str(trained.adapter_dir)},
    )
    summary = {
        "created_at": now_iso(),
        "code_version": code_version(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "config": cfg.to_dict(),
        "outputs": {"triples": str(prepared.triples_dir), **evaluation["outputs"],
                    "report": str(out_dir / "eval" / "report.md")},
        "data": {"counts": prepared.counts, "drops": prepared.drops},
        "train": trained.metrics,
        "sts": evaluation["sts"],
        "retention": evaluation.get("retention", {}).get("compare"),
    }
    write_json(out_dir / "summary.json", summary)
    return summary
