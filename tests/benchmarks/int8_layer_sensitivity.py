"""Which decoder layers can take down_proj in int8: one layer at a time, then the least sensitive ones together.

    python tests/benchmarks/int8_layer_sensitivity.py --senteval-dir ../shared/data/senteval

down_proj in int8 in every layer is 4x the plain fp32 loop under an AVX2 cap but 1.1 Spearman points from
fp32 on STS-B dev (README); its error need not be spread evenly over the layers. Step 1 quantises down_proj
in one layer at a time on top of the default int8 layers and measures how closely the vectors of the first
``--sentences`` SNLI-test premises follow fp32 (``int8_fidelity``'s pair-similarity Spearman; no STS score), and
ranks the layers by it, least harm first. Step 2 takes the first k layers of that ranking for each k of
``--cuts`` and measures the same fidelity plus the Spearman change on the first ``--sts-pairs`` pairs of STS-B
train and SICK train (no dev set), with 95 % paired-bootstrap intervals. The rule, fixed before the run: the
chosen k is the largest cut whose two STS changes are both within ``--max-change`` (0.15) of fp32; the dev set
is not looked at. Plan: about 17 min for step 1 and 2 min per cut, 36 min in all with the default cuts (2 Zen 4
cores under the AVX2 cap). Writes
``tests/benchmarks/results/int8_layer_sensitivity[-TAG].json``.
"""

from __future__ import annotations

import argparse
import copy
import time

from common import save
from int8_fidelity import add_reference_arguments, fp32_reference, sts_changes, sts_similarities
from transformers import AutoConfig

from sempa_train.core.models import resolve_model
from sempa_train.core.templates import PROMPTEOL_TEMPLATE
from sempa_train.stages.embedding import PromptEOLEncoder
from sempa_train.stages.quantize import quantize_int8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reference_arguments(parser)
    parser.add_argument("--senteval-dir", required=True, help="STS-B train and SICK train are read from here")
    parser.add_argument("--cuts", type=int, nargs="+", default=[10, 15, 20, 24, 27, 30],
                        help="numbers of layers (least sensitive first) to try together in step 2")
    parser.add_argument("--max-change", type=float, default=0.15, help="largest STS change the chosen cut may make")
    args = parser.parse_args()
    layers = AutoConfig.from_pretrained(resolve_model(args.model)).num_hidden_layers
    if outside := [k for k in args.cuts if not 0 < k <= layers]:
        parser.error(f"--cuts {outside}: a cut is a number of layers, 1-{layers} for {args.model}")

    model, tokenizer, sentences, fidelity, sets, reference_sts = fp32_reference(args)

    def encoder(down_proj_layers: list[int]) -> PromptEOLEncoder:
        quantized = quantize_int8(copy.deepcopy(model), tokenizer, template=PROMPTEOL_TEMPLATE,
                                  down_proj_layers=down_proj_layers)
        return PromptEOLEncoder(quantized, tokenizer, batch_size=64, show_progress=False)

    def measure(down_proj_layers: list[int], with_sts: bool) -> dict:
        start = time.perf_counter()
        int8 = encoder(down_proj_layers)
        row = {"down_proj_layers": down_proj_layers, **fidelity(int8.encode(sentences))}
        if with_sts:
            row.update(sts_changes(sets, reference_sts, sts_similarities(int8, sets)))
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(row, flush=True)
        return row

    default = measure([], with_sts=True)
    singles = [measure([i], with_sts=False) for i in range(layers)]
    ranking = [row["down_proj_layers"][0] for row in
               sorted(singles, key=lambda r: r["pair_similarity_spearman_x100"], reverse=True)]
    cuts = [measure(sorted(ranking[:k]), with_sts=True) for k in args.cuts]
    within = [row for row in cuts if all(abs(row[f"{s.task}_train"]["delta"]) <= args.max_change for s in sets)]
    chosen = max(within, key=lambda r: len(r["down_proj_layers"]), default=None)
    save("int8_layer_sensitivity", {
        "text": args.text, "sentences": len(sentences), "pairs": args.pairs, "model": args.model,
        "sts_sets": {s.task: len(s.scores) for s in sets}, "max_change": args.max_change,
        "default": default, "singles": singles, "ranking": ranking, "cuts": cuts,
        "chosen_down_proj_layers": None if chosen is None else chosen["down_proj_layers"],
    }, tag=args.tag)


if __name__ == "__main__":
    main()
