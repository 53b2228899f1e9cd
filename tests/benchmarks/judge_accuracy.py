"""The NLI judges side by side: SNLI test accuracy, and how they judge near copies (minimal pairs).

    python tests/benchmarks/judge_accuracy.py sempa-nli-minilm-e3 sempa-nli-minilm-mp

For each judge (a name under ``$SEMPA_CACHE_DIR/models`` or a folder): its 3-class accuracy on SNLI test
(9,824 pairs), and, on the minimal pairs of the SNLI-test premises (``sempa_train/stages/minimal_pairs.py``:
one number, colour or word changed, an action dropped, against entailed copies), the binary accuracy of
``JudgeCheck``'s decision (entailment probability >= 0.5), the share of entailed copies it keeps and of
changed ones it rejects. SNLI test is held out from every judge's training. Writes
``tests/benchmarks/results/judge_accuracy.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import save

from sempa_train.stages.judge import NLIJudge, minimal_pair_accuracy, read_snli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("judges", nargs="+", help="judge names or folders")
    parser.add_argument("--snli-test", type=Path, default=Path("../shared/data/nli/snli/test.jsonl"))
    args = parser.parse_args()
    pairs, labels = read_snli(args.snli_test)
    premises = [p for p, _ in pairs]
    results = {}
    for name in args.judges:
        judge = NLIJudge.load(name)
        predicted = judge.probabilities(pairs).argmax(1)
        results[name] = {"snli_test_accuracy": round(float((predicted == np.asarray(labels)).mean()), 4),
                         "snli_test_pairs": len(pairs), "minimal_pairs": minimal_pair_accuracy(judge, premises)}
        print(name, results[name], flush=True)
    save("judge_accuracy", {"snli_test": str(args.snli_test), "judges": results})


if __name__ == "__main__":
    main()
