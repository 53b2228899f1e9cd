"""Resumable work in shards: the items of a long job split into files written one by one.

A job (sampling candidates for premises, embedding a corpus) splits its items into shards of
``shard_size`` and writes each finished shard atomically to a work folder beside the output
(``.OUT.shards/shard-00000.parquet``). A ``plan.json`` there records what the shards are for (the
config and the item ids), so a re-run with the same inputs skips finished shards and a run with other
inputs is refused instead of mixing files (it also says how many shards there are, for progress
reports). A crash, even ``kill -9``, loses at most the shard in
progress; once every shard exists the job concatenates them and removes the work folder.

Runners: ``ShardRunner`` is how pending shards get done when not in this process — a callable that
receives ``one_shard(index)`` (picklable: a ``functools.partial`` of a module-level function) and the
pending indices (``pipelines.scale`` runs them on a Dask cluster; tests pass doubles).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sempa_train.core.io import read_json, text_id, write_json

ShardRunner = Callable[[Callable[[int], Any], Sequence[int]], None]


@dataclass(frozen=True)
class ShardPlan:
    """Items (ids and texts) split into shards, and the work folder holding finished shards."""

    work_dir: Path
    ids: list[str]
    texts: list[str]
    shard_size: int

    @property
    def n_shards(self) -> int:
        return -(-len(self.ids) // self.shard_size)

    def shard_path(self, index: int) -> Path:
        return self.work_dir / f"shard-{index:05d}.parquet"

    def shard_slice(self, index: int) -> slice:
        return slice(index * self.shard_size, (index + 1) * self.shard_size)

    def shard_items(self, index: int) -> tuple[list[str], list[str]]:
        """The ids and texts of shard ``index``."""
        part = self.shard_slice(index)
        return self.ids[part], self.texts[part]

    def pending(self) -> list[int]:
        return [i for i in range(self.n_shards) if not self.shard_path(i).is_file()]

    def done_items(self) -> int:
        """How many items the finished shards hold."""
        return sum(len(self.ids[self.shard_slice(i)]) for i in range(self.n_shards) if self.shard_path(i).is_file())


def work_dir_for(out_dir: Path) -> Path:
    """Where the shards of ``out_dir`` are kept until the output is assembled."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.shards"


def open_shards(out_dir: Path, ids: Sequence[str], texts: Sequence[str], shard_size: int,
                config: dict[str, Any]) -> ShardPlan:
    """The shard plan of ``out_dir``: a new work folder, or an earlier run's when it was for the same ``config``
    and items (its finished shards are then reused). Another run's work folder with finished shards is an
    error; one without any (a start that failed, e.g. on a mistyped model name) is replaced."""
    work = work_dir_for(out_dir)
    plan = ShardPlan(work, list(ids), list(texts), shard_size)
    fingerprint = {"config": config, "ids": text_id(*plan.ids), "shards": plan.n_shards}
    plan_file = work / "plan.json"
    same = plan_file.is_file() and read_json(plan_file) == fingerprint
    if plan_file.is_file() and not same and any(work.glob("shard-*.parquet")):
        raise ValueError(f"{work} holds shards of a run with another config or other inputs; "
                         "remove it (or pass --overwrite) to start over")
    if same:
        for stale in work.glob(".*.tmp-*"):  # a shard being written when the process died
            stale.unlink()
    else:  # a new plan, or the plan of a run that never finished a shard (a failed start): nothing to keep
        work.mkdir(parents=True, exist_ok=True)
        write_json(plan_file, fingerprint)
    return plan
