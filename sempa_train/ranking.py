"""Preference triples (``prompt``, ``chosen``, ``rejected``) from NLI triples.

``gold`` is the paper's strategy: the prompt is the premise in the paraphrase template, chosen is
the entailment hypothesis (it keeps the meaning), rejected is the contradiction hypothesis.
"""

from __future__ import annotations

import polars as pl

from sempa_train.io import text_id
from sempa_train.schemas import PREFERENCE_SCHEMA
from sempa_train.templates import fill, resolve_template


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
    rows = [
        preference_row(
            premise_id=t["premise_id"], premise=t["premise"], template=template,
            chosen=t["entailment"], rejected=t["contradiction"],
            chosen_origin="gold", rejected_origin="gold", strategy="gold", source=t["source"],
            chosen_row=t["entailment_row"], rejected_row=t["contradiction_row"],
        )
        for t in triples.iter_rows(named=True)
    ]
    return pl.DataFrame(rows, schema=PREFERENCE_SCHEMA)
