"""Where on STS-B dev a tuned model gains: the change of Spearman x 100 per genre and per source file.

    python tests/benchmarks/genre_deltas.py outputs/runs/recipe-seed3 outputs/runs/recipe-seed4 --name genre-deltas

Reads each run's ``eval/base.predictions.parquet`` and ``eval/tuned.predictions.parquet`` (the cosine of every
STS-B dev pair, in file order) and STS-B dev's genre and source columns (``sts_data``); runs no model. STS-B dev
mixes genres in other proportions than STS-B train (dev 25 % forums, train 8 %; news 33 % against 57 %), so an
in-training probe of random train pairs reads mostly the genres where a model gains least: this script shows
which those are.
Writes ``tests/benchmarks/results/<name>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl
from common import save
from scipy.stats import spearmanr

from sempa_train.stages.sts_data import load_senteval_task


def cosines(path: Path, gold: np.ndarray) -> np.ndarray:
    """Cosines of the STS-B pairs in ``path``, checked to be in the order of STS-B dev (its ``gold`` scores)."""
    df = pl.read_parquet(path).filter(pl.col("task") == "STSBenchmark")
    if df.height != len(gold):
        raise ValueError(f"{path}: {df.height} STS-B pairs, but STS-B dev has {len(gold)}")
    if not np.allclose(df["gold"].to_numpy(), gold):
        raise ValueError(f"{path}: the gold scores are not in the order of STS-B dev")
    return df["cosine"].to_numpy()


def deltas(gold: np.ndarray, base: np.ndarray, tuned: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Tuned minus base Spearman x 100 over all pairs and within each label."""
    def rho(mask: np.ndarray, cos: np.ndarray) -> float:
        return float(spearmanr(gold[mask], cos[mask])[0] * 100)

    everything = np.ones(len(gold), dtype=bool)
    out = {"all": rho(everything, tuned) - rho(everything, base)}
    for label in sorted(set(labels)):
        mask = labels == label
        out[label] = rho(mask, tuned) - rho(mask, base)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="sempa run output folders (with eval/)")
    parser.add_argument("--senteval-dir", type=Path, default=Path("../shared/data/senteval"))
    parser.add_argument("--name", required=True, help="results file name")
    args = parser.parse_args()
    dev = load_senteval_task(args.senteval_dir, "STSBenchmark", "dev")[0]
    gold, files, genres = dev.scores, np.array(dev.sources), np.array(dev.genres)
    results, lines = {}, []
    labels = sorted(set(files))
    lines.append("| run | all | " + " | ".join(f"{f} ({(files == f).sum()})" for f in labels) + " |")
    lines.append("|---" * (len(labels) + 2) + "|")
    for run in args.runs:
        base = cosines(run / "eval" / "base.predictions.parquet", gold)
        tuned = cosines(run / "eval" / "tuned.predictions.parquet", gold)
        by_file = deltas(gold, base, tuned, files)
        results[str(run)] = {"by_file": by_file, "by_genre": deltas(gold, base, tuned, genres)}
        lines.append(f"| {run.name} | {by_file['all']:+.2f} | " + " | ".join(f"{by_file[f]:+.2f}" for f in labels)
                     + " |")
    table = "\n".join(lines)
    save(args.name, {"runs": results, "pairs_by_file": {f: int((files == f).sum()) for f in labels}, "table": table})
    print(table)


if __name__ == "__main__":
    main()
