"""The NLI judges side by side: SNLI test accuracy, and how they judge near copies (minimal pairs).

    python tests/benchmarks/judge_accuracy.py sempa-nli-minilm-e3 sempa-nli-minilm-mp

For each judge (a name under ``$SEMPA_CACHE_DIR/models`` or a folder): its 3-class accuracy on SNLI test
(9,824 pairs), and, on the minimal pairs of the SNLI-test premises (``sempa_train/stages/minimal_pairs.py``:
one number, colour or word changed, an action dropped, against entailed copies), the binary accuracy of
``JudgeCheck``'s decision (entailment probability >= 0.5), the share of entailed copies it keeps and of
changed ones it rejects. SNLI test is held out from every judge's training. Writes
``tests/benchmarks/results/judge_accuracy[-TAG].json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import save

from sempa_train.stages.judge import NLIJudge, assess_judge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("judges", nargs="+", help="judge names or folders")
    parser.add_argument("--snli-test", type=Path, default=Path("../shared/data/nli/snli/test.jsonl"))
    parser.add_argument("--tag", default="", help="results file suffix: judge_accuracy-TAG.json")
    args = parser.parse_args()
    results = {}
    for name in args.judges:
        assessed = assess_judge(NLIJudge.load(name), args.snli_test)
        results[name] = {"snli_test_accuracy": assessed["snli_test"]["accuracy"],
                         "snli_test_pairs": assessed["snli_test"]["pairs"],
                         "minimal_pairs": assessed["snli_test_minimal_pairs"]}
        print(name, results[name], flush=True)
    save("judge_accuracy", {"snli_test": str(args.snli_test), "judges": results}, tag=args.tag)


if __name__ == "__main__":
    main()
