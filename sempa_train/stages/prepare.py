"""The prepare stage: NLI source → ``triples`` and gold ``preferences`` dataset folders.

Output (written as one unit: a failure leaves nothing behind)::

    OUT/triples/       (premise, entailment, contradiction) per premise, with source rows
    OUT/preferences/   the paper's gold preference triples (prompt, chosen, rejected)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sempa_train.core.config import PrepareConfig
from sempa_train.core.io import atomic_dir, file_sha256, write_dataset
from sempa_train.stages.preferences import gold_preferences
from sempa_train.stages.sources import SourceError, group_triples, read_nli

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareResult:
    """Where prepare wrote its datasets, and what it counted."""

    out_dir: Path
    counts: dict[str, int]
    drops: dict[str, int]

    @property
    def triples_dir(self) -> Path:
        return self.out_dir / "triples"

    @property
    def preferences_dir(self) -> Path:
        return self.out_dir / "preferences"


def format_counts(counts: dict[str, int]) -> str:
    """``a=1,234 b=5`` (for one-line summaries)."""
    return " ".join(f"{k}={v:,}" for k, v in counts.items()) or "none"


def prepare(cfg: PrepareConfig, out_dir: Path, *, overwrite: bool = False) -> PrepareResult:
    """Read and validate the NLI source, group it into triples, build the gold preferences, write both."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:  # fail before the (possibly long) read
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    pairs = read_nli(cfg.source, cfg.source_format, cfg.split)
    triples = group_triples(pairs, pairing=cfg.pairing, seed=cfg.seed, max_premises=cfg.max_premises,
                            max_premise_words=cfg.max_premise_words)
    if triples.table.is_empty():
        raise SourceError(
            f"{cfg.source}: no premise has both an entailment and a contradiction hypothesis "
            f"(rows read: {pairs.rows:,}; dropped: {format_counts(triples.drops)})"
        )
    preferences = gold_preferences(triples.table, cfg.template)
    source_path = Path(cfg.source)
    parents = {"source_sha256": file_sha256(source_path)} if source_path.is_file() else {}
    common = {"config": cfg.to_dict(), "source": cfg.source, "counts": triples.counts, "drops": triples.drops}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        manifest = write_dataset(
            tmp / "triples", triples.table, kind="triples", parents=parents,
            description="NLI triples grouped by premise: one entailment and one contradiction hypothesis each.",
            **common,
        )
        write_dataset(
            tmp / "preferences", preferences, kind="preferences",
            parents={**parents, "triples_sha256": manifest["data_sha256"]},
            description="Gold preference triples (SemPA paper mode): prompt = premise in the paraphrase "
            "template, chosen = entailment, rejected = contradiction.",
            **common,
        )
    log.info("prepare: %s triples from %s rows (%s premises); dropped %s", f"{triples.table.height:,}",
             f"{pairs.rows:,}", f"{triples.counts['premises']:,}", format_counts(triples.drops))
    return PrepareResult(out_dir=out_dir, counts=triples.counts, drops=triples.drops)
