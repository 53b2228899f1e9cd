"""Polars schemas of every table the pipeline writes, as values.

Each stage's output is one of these tables. Reading and writing go through ``sempa_train.core.io``, which
checks the schema both ways, so a table that does not match is a clear error naming the file and the
column. Column names of the preference table follow TRL (``prompt``, ``chosen``, ``rejected``), so
it feeds ``DPOTrainer`` directly.
"""

from __future__ import annotations

import polars as pl

# (premise, entailment, contradiction) grouped from NLI pairs.
TRIPLES_SCHEMA = pl.Schema(
    {
        "premise_id": pl.String,  # stable hash of the premise text
        "premise": pl.String,
        "entailment": pl.String,
        "contradiction": pl.String,
        "source": pl.String,  # file path or dataset id the pairs came from
        "entailment_row": pl.Int64,  # row (0-based) of the entailment pair in the source
        "contradiction_row": pl.Int64,
    }
)

# Preference triples for DPO, with scores and provenance.
PREFERENCE_SCHEMA = pl.Schema(
    {
        "pair_id": pl.String,  # stable hash of (prompt, chosen, rejected)
        "premise_id": pl.String,
        "premise": pl.String,
        "prompt": pl.String,  # premise in the paraphrase template
        "chosen": pl.String,
        "rejected": pl.String,
        "chosen_origin": pl.String,  # "gold" (NLI hypothesis) or "sampled" (model candidate)
        "rejected_origin": pl.String,
        "chosen_score": pl.Float64,  # scorer similarity to the premise; null in gold mode
        "rejected_score": pl.Float64,
        "margin": pl.Float64,  # chosen_score - rejected_score; null when either is null
        "template_id": pl.String,  # P1..P5 or "custom"
        "strategy": pl.String,  # gold | sampled | hybrid
        "source": pl.String,
        "chosen_row": pl.Int64,  # source row of a gold side, null for a sampled side
        "rejected_row": pl.Int64,
    }
)

# Paraphrase candidates sampled from the policy, n per premise, with generation metadata.
CANDIDATES_SCHEMA = pl.Schema(
    {
        "premise_id": pl.String,
        "premise": pl.String,
        "candidate_idx": pl.Int64,  # 0..n-1 within the premise
        "text": pl.String,  # cleaned candidate (first line, no "Paraphrase:" prefix or quotes)
        "raw_text": pl.String,  # what the model generated
        "finish_reason": pl.String,  # "stop" (end of sequence) or "length" (hit max_tokens)
        "prompt_tokens": pl.Int64,
        "completion_tokens": pl.Int64,
        "backend": pl.String,  # vllm | transformers
        "model": pl.String,
        "template_id": pl.String,
        "temperature": pl.Float64,
        "top_p": pl.Float64,
        "max_tokens": pl.Int64,
        "seed": pl.Int64,  # the premise's own seed
    }
)

# Per-pair STS predictions of one evaluation (for scatter plots and error analysis).
PREDICTIONS_SCHEMA = pl.Schema(
    {
        "task": pl.String,
        "subset": pl.String,
        "split": pl.String,
        "sentence1": pl.String,
        "sentence2": pl.String,
        "gold": pl.Float64,
        "cosine": pl.Float64,
    }
)



def embeddings_schema(dim: int) -> pl.Schema:
    """An embedded corpus (``sempa embed``): one row per distinct text; the vector's size is the model's."""
    return pl.Schema(
        {
            "id": pl.String,  # stable hash of the text
            "text": pl.String,
            "vector": pl.Array(pl.Float32, dim),  # the PromptEOL embedding (L2-normalised with --normalize)
        }
    )


SCHEMAS: dict[str, pl.Schema] = {
    "triples": TRIPLES_SCHEMA,
    "candidates": CANDIDATES_SCHEMA,
    "preferences": PREFERENCE_SCHEMA,
    "predictions": PREDICTIONS_SCHEMA,
}


def schema_for(kind: str) -> pl.Schema:
    """The schema registered under ``kind`` (``triples``, ``preferences``, ...)."""
    try:
        return SCHEMAS[kind]
    except KeyError:
        raise ValueError(f"unknown table kind {kind!r}; known: {', '.join(SCHEMAS)}") from None
