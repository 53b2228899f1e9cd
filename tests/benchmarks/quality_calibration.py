"""Where the absolute checks of the rank stage draw their lines: measured on a finished run's data.

    python tests/benchmarks/quality_calibration.py outputs/runs/quick-seed0

From the run's candidates, triples and preferences: (1) py3langid's English probability of the
candidates, the premises and the gold entailment hypotheses, and how many of each the language check
(``LanguageCheck``: a confident other language, or > 5 % non-Latin letters) flags; (2) the policy's
mean token log-probability (``FluencyCheck``) of 600 seeded candidates, of 300 gold entailments and
contradictions, and of the word-salad examples the data-quality issue reported; (3) the embedding
score of the sampled chosen answers. Writes ``tests/benchmarks/results/quality_calibration.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl
from common import save

from sempa_train.stages.quality import FluencyCheck, LanguageCheck, language_identifier

# Chosen answers the issue found in a published dataset, with premises of their kind.
REPORTED = [
    ("A woman in a red coat is walking her dog along the beach.",
     'Spanišiština odleglosuna povďća: "A man in a red coat is walking his dog along the beach."'),
    ("A man is fixing a bicycle in a garage.", "Herrera was fixing a bicycle. Meyers made the child."),
    ("A cat sits on a bed.", "Can the cat make a bedout?"),
    ("A man plays the piano at a marina.",
     "Messingi wesner di marina fi, sjık, hghd in ochik med lucky diffratul piano."),
    ("A person stands in a room.", "Someone or something, please."),
]
QUANTILES = (0.01, 0.05, 0.1, 0.5)


def quantiles(values: np.ndarray) -> dict[str, float]:
    return {f"q{int(q * 100):02d}": round(float(np.quantile(values, q)), 3) for q in QUANTILES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a sempa run folder with candidates/, data/triples, preferences/")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()

    candidates = pl.read_parquet(args.run / "candidates" / "data.parquet").filter(pl.col("text") != "")
    triples = pl.read_parquet(args.run / "data" / "triples" / "data.parquet")
    prefs = pl.read_parquet(args.run / "preferences" / "data.parquet")
    identifier, language = language_identifier(), LanguageCheck("en")

    def english(texts: list[str]) -> dict[str, float]:
        probs = np.array([dict(identifier.rank(t)).get("en", 0.0) for t in texts])
        flagged = sum(language.is_other_language(t) for t in texts)
        return {"n": len(texts), **quantiles(probs), "share_below_0.5": round(float((probs < 0.5).mean()), 4),
                "flagged_by_check": int(flagged)}

    fluency = FluencyCheck.load(args.model, template="P1", min_logprob=-3.0)
    sample = candidates.sample(600, seed=0)
    gold = triples.head(300)
    fluency_of = {
        "candidates (600 seeded)": fluency.mean_logprobs(sample["premise"].to_list(), sample["text"].to_list()),
        "gold entailments (300)": fluency.mean_logprobs(gold["premise"].to_list(), gold["entailment"].to_list()),
        "gold contradictions (300)": fluency.mean_logprobs(gold["premise"].to_list(),
                                                           gold["contradiction"].to_list()),
    }
    reported = fluency.mean_logprobs([p for p, _ in REPORTED], [c for _, c in REPORTED])
    chosen = prefs.filter(pl.col("chosen_origin") == "sampled")["chosen_score"].drop_nulls().to_numpy()
    save("quality_calibration", {
        "run": str(args.run),
        "language": {"candidates": english(candidates["text"].to_list()),
                     "premises": english(triples["premise"].to_list()),
                     "gold_entailments": english(triples["entailment"].to_list()),
                     "reported_examples_flagged": [language.is_other_language(c) for _, c in REPORTED]},
        "fluency_mean_token_logprob": {
            **{name: {**quantiles(values), "share_below_-3.0": round(float((values < -3.0).mean()), 4)}
               for name, values in fluency_of.items()},
            "reported_examples": {c: round(float(v), 2) for (_, c), v in zip(REPORTED, reported, strict=True)}},
        "embedding_score_of_sampled_chosen": {"n": len(chosen), **quantiles(chosen),
                                              "share_below_0.5": round(float((chosen < 0.5).mean()), 4)},
    })


if __name__ == "__main__":
    main()
