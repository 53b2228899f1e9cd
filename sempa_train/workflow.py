"""The paper's whole method in one process: prepare → evaluate base → train → evaluate tuned.

This is the single-machine path behind ``sempa run``; the Prefect flows in ``pipelines/`` run the
same stage functions as separate tasks. Output::

    OUT/data/triples, OUT/data/preferences   prepare
    OUT/model/                               train (adapter, logs, manifest)
    OUT/eval/base.json, OUT/eval/tuned.json  STS results (the ``sempa eval`` contract)
    OUT/summary.json                         what ran, where everything is, base vs tuned
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sempa_train.config import EmbedConfig, EvalConfig, PrepareConfig, TrainConfig
from sempa_train.evaluation import format_table, run_sts_eval
from sempa_train.io import code_version, now_iso, write_json
from sempa_train.prepare import prepare
from sempa_train.sts_data import load_tasks
from sempa_train.train import train_dpo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """The configs of every stage of a run (a YAML file with sections prepare/train/eval/embed)."""

    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig.preset("cpu"))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(tasks=("STSBenchmark",), split="dev"))
    embed: EmbedConfig = field(default_factory=EmbedConfig)

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        """Read a YAML file with sections ``prepare``, ``train`` (may name a ``preset``), ``eval``, ``embed``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        unknown = set(values) - {"prepare", "train", "eval", "embed"}
        if unknown:
            raise ValueError(
                f"{path}: unknown section(s) {', '.join(sorted(unknown))}; known: prepare, train, eval, embed")
        default = cls()
        try:
            train_values = dict(values.get("train") or {})
            train_base = TrainConfig.preset(train_values.pop("preset")) if "preset" in train_values else default.train
            return cls(
                prepare=PrepareConfig.from_dict(values.get("prepare") or {}, base=default.prepare),
                train=TrainConfig.from_dict(train_values, base=train_base),
                eval=EvalConfig.from_dict(values.get("eval") or {}, base=default.eval),
                embed=EmbedConfig.from_dict(values.get("embed") or {}, base=default.embed),
            )
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return {"prepare": self.prepare.to_dict(), "train": self.train.to_dict(), "eval": self.eval.to_dict(),
                "embed": self.embed.to_dict()}


def run_method(cfg: RunConfig, out_dir: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Run prepare, base evaluation, DPO training and tuned evaluation; return the summary."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty; pass --overwrite or another --out")
    started = time.perf_counter()
    # Load the evaluation data first: a missing STS folder should fail before any training.
    tasks = load_tasks(cfg.eval.tasks, cfg.eval.split, cfg.eval.senteval_dir)
    prepared = prepare(cfg.prepare, out_dir / "data", overwrite=overwrite)
    eval_dir = out_dir / "eval"
    base = run_sts_eval(cfg.train.model, cfg.eval, cfg.embed, out=eval_dir / "base.json", tasks=tasks)
    trained = train_dpo(cfg.train, prepared.preferences_dir, out_dir / "model", overwrite=overwrite)
    tuned = run_sts_eval(cfg.train.model, cfg.eval, cfg.embed, adapter=trained.adapter_dir,
                         out=eval_dir / "tuned.json", tasks=tasks)
    summary = {
        "created_at": now_iso(),
        "code_version": code_version(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "config": cfg.to_dict(),
        "outputs": {
            "triples": str(prepared.triples_dir),
            "preferences": str(prepared.preferences_dir),
            "adapter": str(trained.adapter_dir),
            "train_log": str(trained.out_dir / "train_log.jsonl"),
            "eval_base": str(eval_dir / "base.json"),
            "eval_tuned": str(eval_dir / "tuned.json"),
        },
        "data": {"counts": prepared.counts, "drops": prepared.drops},
        "train": trained.metrics,
        "sts": {"base": base["avg"], "tuned": tuned["avg"], "delta": tuned["avg"] - base["avg"]},
        "table": format_table(tuned, compare=base),
    }
    write_json(out_dir / "summary.json", summary)
    return summary
