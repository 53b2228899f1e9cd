"""Preference rows: one place that builds a row of ``PREFERENCE_SCHEMA`` (prompt, chosen, rejected and provenance).

The prepare stage writes the paper's gold pairs with it; the rank stage its sampled and hybrid pairs.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from sempa_train.core.io import text_id
from sempa_train.core.schemas import PREFERENCE_SCHEMA
from sempa_train.core.templates import fill, resolve_template


def preference_row(
    *,
    premise_id: str,
    premise: str,
    template: str,
    chosen: str,
    rejected: str,
    chosen_origin: str,
    rejected_origin: str,
    strategy: str,
    source: str,
    chosen_score: float | None = None,
    rejected_score: float | None = None,
    chosen_row: int | None = None,
    rejected_row: int | None = None,
) -> dict[str, object]:
    """One row of ``PREFERENCE_SCHEMA``; ``template`` is a template name or custom text."""
    template_id, template_text = resolve_template(template)
    prompt = fill(template_text, premise)
    margin = None if chosen_score is None or rejected_score is None else chosen_score - rejected_score
    return {
        "pair_id": text_id(prompt, chosen, rejected),
        "premise_id": premise_id,
        "premise": premise,
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_origin": chosen_origin,
        "rejected_origin": rejected_origin,
        "chosen_score": chosen_score,
        "rejected_score": rejected_score,
        "margin": margin,
        "template_id": template_id,
        "strategy": strategy,
        "source": source,
        "chosen_row": chosen_row,
        "rejected_row": rejected_row,
    }


def gold_preferences(triples: pl.DataFrame, template: str = "P1") -> pl.DataFrame:
    """The paper's preference table: prompt = template(premise), chosen = entailment, rejected = contradiction."""
    rows = [gold_row(t, template=template, strategy="gold") for t in triples.iter_rows(named=True)]
    return pl.DataFrame(rows, schema=PREFERENCE_SCHEMA)


def gold_row(triple: dict[str, Any], *, template: str, strategy: str,
             scores: dict[tuple[str, str], float] | None = None) -> dict[str, object]:
    """The gold pair of one NLI triple (entailment over contradiction), scored when ``scores`` has them."""
    premise, scores = triple["premise"], scores or {}
    return preference_row(
        premise_id=triple["premise_id"], premise=premise, template=template,
        chosen=triple["entailment"], rejected=triple["contradiction"], chosen_origin="gold", rejected_origin="gold",
        strategy=strategy, source=triple["source"],
        chosen_score=scores.get((premise, triple["entailment"])),
        rejected_score=scores.get((premise, triple["contradiction"])),
        chosen_row=triple["entailment_row"], rejected_row=triple["contradiction_row"],
    )
