"""``sempa inspect``: a polars summary of a dataset folder or Parquet file, and its worst chosen answers."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from sempa_train.core.io import read_any


def describe(path: Path, *, rows: int = 5) -> str:
    """Rows, columns, text length stats, numeric stats, drop counts and the first ``rows`` rows."""
    df, manifest = read_any(Path(path))
    out = [f"{path}: {df.height:,} rows x {df.width} columns" + (f" ({manifest['kind']})" if manifest else "")]
    if manifest:
        out.append(f"source: {manifest.get('source')}  created: {manifest.get('created_at')}  "
                   f"code: {manifest.get('code_version')}")
    text_cols = [c for c, t in df.schema.items() if t == pl.String and not c.endswith("_id")]
    if text_cols and df.height:
        stats = pl.concat([
            df.select(
                pl.lit(c).alias("column"),
                pl.col(c).str.len_chars().mean().round(1).alias("chars_mean"),
                pl.col(c).str.len_chars().min().alias("chars_min"),
                pl.col(c).str.len_chars().max().alias("chars_max"),
                pl.col(c).str.split(" ").list.len().mean().round(1).alias("words_mean"),
                pl.col(c).null_count().alias("nulls"),
                pl.col(c).n_unique().alias("unique"),
            )
            for c in text_cols
        ])
        out += ["", "text columns:", str(stats)]
    num_cols = [c for c, t in df.schema.items() if t.is_numeric()]
    if num_cols and df.height:
        out += ["", "numeric columns:", str(df.select(num_cols).describe())]
    if manifest.get("drops"):
        out += ["", "dropped: " + ", ".join(f"{k}={v:,}" for k, v in manifest["drops"].items())]
    with pl.Config(fmt_str_lengths=60, tbl_cols=12, tbl_width_chars=160):
        out += ["", f"first {min(rows, df.height)} rows:", str(df.head(rows))]
    return "\n".join(out)


def worst_chosen(path: Path, n: int) -> str:
    """The ``n`` scored chosen answers of a preference dataset with the lowest score, each with its premise: the
    first rows to read when auditing what DPO is taught to prefer."""
    df, manifest = read_any(Path(path))
    missing = {"premise", "chosen", "chosen_score"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: --worst needs a preference dataset (columns premise, chosen, chosen_score); "
                         f"missing {', '.join(sorted(missing))}")
    scored = df.filter(pl.col("chosen_score").is_not_null()).sort("chosen_score").head(n)
    if scored.is_empty():
        return f"{path}: no scored chosen answer (a gold dataset without a scorer)"
    out = [f"{path}: the {scored.height} lowest-scoring chosen answers of {df.height:,} pairs"
           + (f" (scorer {manifest['config'].get('scorer_used')})" if manifest.get("config") else "")]
    for row in scored.iter_rows(named=True):
        out += ["", f"{row['chosen_score']:.3f}  premise: {row['premise']}", f"       chosen:  {row['chosen']}"]
    return "\n".join(out)
