"""What the absolute checks do to a real sampled preference dataset, and 50 kept pairs for a human to read.

    python tests/benchmarks/data_quality.py outputs/runs/full-seed1 --out outputs/quality

Ranks the run's candidates (its 1,000 SNLI-dev premises, 4 candidates each) with the ``sampled`` strategy
twice: without absolute checks, and with all of them (``drop_meta_answers``, ``language=en``,
``min_fluency=-3.0``, ``min_chosen_score=0.5``, ``judge=sempa-nli-minilm`` or ``--judge``). For each it
reports the pairs kept, the drops by reason, the share of kept chosen answers the judge labels entailment
(premise → chosen, and both ways), and the share the language or fluency check flags; it writes 50 seeded
random kept pairs of the checked dataset to ``--doc`` for reading (``--exclude-doc``: premises an earlier
reading listed are not drawn again, so a second reading is of pairs no one has looked at). Needs the judge
(``sempa judge build``). Writes ``tests/benchmarks/results/data_quality[-TAG].json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import polars as pl
from common import sample_doc_pairs, save

from sempa_train.core.config import RankConfig
from sempa_train.core.io import read_manifest
from sempa_train.stages.judge import NLIJudge
from sempa_train.stages.quality import FluencyCheck, LanguageCheck
from sempa_train.stages.ranking import rank

CHECKED = {"drop_meta_answers": True, "language": "en", "drop_unknown_words": True, "drop_number_changes": True,
           "drop_repetitions": True, "drop_swapped_roles": True,
           "min_fluency": -3.0, "min_chosen_score": 0.5,
           "judge": "sempa-nli-minilm"}
DOCS = Path(__file__).resolve().parents[2] / "docs"


def audit(prefs: Path, judge: NLIJudge, language: LanguageCheck, fluency: FluencyCheck) -> dict[str, object]:
    table = pl.read_parquet(prefs / "data.parquet")
    premises, chosen = table["premise"].to_list(), table["chosen"].to_list()
    forward = judge.probabilities(list(zip(premises, chosen, strict=True))).argmax(1) == 0
    backward = judge.probabilities(list(zip(chosen, premises, strict=True))).argmax(1) == 0
    manifest = read_manifest(prefs)
    return {
        "pairs": table.height, "drops": manifest["drops"], "quality": manifest.get("quality", {}),
        "judge_entailed_share": round(float(forward.mean()), 4),
        "judge_entailed_both_ways_share": round(float((forward & backward).mean()), 4),
        "language_flagged_share": round(float(np.mean(language.failing(premises, chosen))), 4),
        "fluency_flagged_share": round(float(np.mean(fluency.failing(premises, chosen))), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a sempa run folder with candidates/ and data/triples")
    parser.add_argument("--out", type=Path, default=Path("outputs/quality"))
    parser.add_argument("--sample", type=int, default=50)
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--judge", default=CHECKED["judge"], help="judge name or folder")
    parser.add_argument("--doc", type=Path, default=DOCS / "quality_sample.md", help="where the sample is listed")
    parser.add_argument("--exclude-doc", type=Path, action="append", default=[],
                        help="an earlier reading (markdown table): its premises are not drawn again")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    checked = {**CHECKED, "judge": args.judge}

    base = RankConfig(strategy="sampled", contamination_dir="../shared/data/senteval")
    results = {}
    for name, cfg in (("unchecked", base), ("checked", base.replace(**checked))):
        rank(cfg, args.out / name, triples=args.run / "data" / "triples", candidates=args.run / "candidates",
             overwrite=True)
    judge, language = NLIJudge.load(checked["judge"]), LanguageCheck("en")
    fluency = FluencyCheck.load(base.model, template=base.template, min_logprob=CHECKED["min_fluency"])
    for name in ("unchecked", "checked"):
        results[name] = audit(args.out / name, judge, language, fluency)

    read_before = {row["premise"] for doc in args.exclude_doc for row in sample_doc_pairs(doc)}
    pool = pl.read_parquet(args.out / "checked" / "data.parquet").filter(~pl.col("premise").is_in(list(read_before)))
    kept = pool.sample(args.sample, seed=args.sample_seed)
    command = " ".join(["python tests/benchmarks/data_quality.py", *map(str, sys.argv[1:])])
    lines = [f"# {args.sample} random kept pairs of the checked `sampled` dataset", "",
             f"`{command}`: the run's 1,000 SNLI-dev premises, 4 SmolLM2 candidates each, ranked with every "
             "absolute check on (" + ", ".join(f"{k}={v}" for k, v in checked.items()) + f"); sample seed "
             f"{args.sample_seed}" + (f", {len(read_before)} premises of earlier readings left out" if read_before
                                      else "") + ".",
             "", "| # | premise | chosen | rejected (SNLI contradiction) |", "|---|---|---|---|"]
    for i, row in enumerate(kept.iter_rows(named=True), 1):
        cells = [str(row[k]).replace("|", "\\|") for k in ("premise", "chosen", "rejected")]
        lines.append(f"| {i} | {cells[0]} | {cells[1]} | {cells[2]} |")
    args.doc.write_text("\n".join(lines) + "\n", encoding="utf-8")
    save("data_quality", {"run": str(args.run), "checks": checked, "results": results, "sample_doc": str(args.doc)},
         tag=args.tag)


if __name__ == "__main__":
    main()
