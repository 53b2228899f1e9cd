"""What the rank stage's text checks would flag among the pairs developers have read by hand.

    python tests/benchmarks/reading_checks.py docs/quality_sample*.md

Each ``docs/quality_sample*.md`` lists 50 kept (premise, chosen) pairs and, under "## Reading", the numbers of
those that are not real paraphrases (``- #N: ...``). For every text check (no model: meta answer, unknown word,
number, repetition, swapped roles) this counts how many read-as-real and read-as-not pairs it flags: a check
worth adding flags the second kind and not the first. With ``--signals``, also the model-based signals one
might threshold instead, each as the area under the ROC curve of telling read-as-not pairs from real ones (0.5:
no better than chance): the policy's mean token log-probability of the candidate as its paraphrase of the
premise (``FluencyCheck``), a back-translation score (the same of the premise as a paraphrase of the candidate,
minus that of the premise as a paraphrase of itself) and the judge's lower entailment probability of the two
directions. Writes ``tests/benchmarks/results/reading_checks[-TAG].json``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from common import sample_doc_pairs, save

from sempa_train.stages.quality import (
    CandidateCheck,
    MetaAnswerCheck,
    NumberCheck,
    RepetitionCheck,
    RoleSwapCheck,
    SpellingCheck,
)

MISS = re.compile(r"^- #(\d+):", re.MULTILINE)


def read_doc(path: Path) -> list[dict[str, object]]:
    """The doc's pairs with the reader's verdict; a doc without a reading section is an error."""
    text = path.read_text(encoding="utf-8")
    if "## Reading" not in text:
        raise ValueError(f"{path}: no '## Reading' section, so no verdicts to compare with")
    misses = {int(n) for n in MISS.findall(text.split("## Reading", 1)[1])}
    rows = [{"doc": path.name, **row, "real": row["n"] not in misses} for row in sample_doc_pairs(path)]
    if not rows:
        raise ValueError(f"{path}: no pair rows ('| N | premise | chosen | rejected |') found")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("docs", type=Path, nargs="+", help="reading docs (docs/quality_sample*.md)")
    parser.add_argument("--signals", action="store_true", help="also the model-based signals (policy and judge)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the policy, for --signals")
    parser.add_argument("--judge", default="sempa-nli-minilm-mp2", help="the NLI judge, for --signals")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    args = parser.parse_args()
    rows = [row for doc in args.docs for row in read_doc(doc)]
    checks: list[CandidateCheck] = [MetaAnswerCheck(), SpellingCheck(), NumberCheck(), RepetitionCheck(),
                                    RoleSwapCheck()]
    premises, chosen = [r["premise"] for r in rows], [r["chosen"] for r in rows]
    result: dict[str, object] = {"docs": [d.name for d in args.docs], "pairs": len(rows),
                                 "read_real": sum(bool(r["real"]) for r in rows)}
    for check in checks:
        flagged = [r for r, bad in zip(rows, check.failing(premises, chosen), strict=True) if bad]
        result[check.reason] = {
            "flags_real": sum(bool(r["real"]) for r in flagged),
            "flags_not_real": sum(not r["real"] for r in flagged),
            "flagged": [f"{r['doc']} #{r['n']} ({'real' if r['real'] else 'not real'}): {r['chosen']}"
                        for r in flagged],
        }
        print(f"{check.reason:26s} flags {result[check.reason]['flags_not_real']:3d} not real, "
              f"{result[check.reason]['flags_real']:3d} real")
    if args.signals:
        result["signal_auc"] = signal_aucs(premises, chosen, [bool(r["real"]) for r in rows], args.model, args.judge)
        print(result["signal_auc"])
    save("reading_checks", result, tag=args.tag)


def auc(values: np.ndarray, real: np.ndarray) -> float:
    """P(a read-as-not pair scores below a real one), ties half: how well a floor on ``values`` separates them."""
    bad, good = values[~real], values[real]
    return float(np.mean((bad[:, None] < good[None, :]) + 0.5 * (bad[:, None] == good[None, :])))


def signal_aucs(premises: list[str], chosen: list[str], real: list[bool], model: str, judge: str) -> dict[str, float]:
    from sempa_train.stages.judge import NLIJudge
    from sempa_train.stages.quality import FluencyCheck

    fluency = FluencyCheck.load(model, template="P1", min_logprob=-3.0)
    nli = NLIJudge.load(judge)
    signals = {
        "policy_fluency": fluency.mean_logprobs(premises, chosen),
        "back_translation": fluency.mean_logprobs(chosen, premises) - fluency.mean_logprobs(premises, premises),
        "judge_min_entailment": np.minimum(nli.probabilities(list(zip(premises, chosen, strict=True)))[:, 0],
                                           nli.probabilities(list(zip(chosen, premises, strict=True)))[:, 0]),
    }
    return {name: round(auc(np.asarray(v), np.asarray(real)), 3) for name, v in signals.items()}


if __name__ == "__main__":
    main()
