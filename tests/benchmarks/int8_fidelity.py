"""How closely int8 PromptEOL follows fp32, measured on text that no STS score comes from.

    python tests/benchmarks/int8_fidelity.py --text ../shared/data/nli/snli/test.jsonl --sentences 1000

Encodes the first ``--sentences`` distinct premises of an NLI file (SNLI test: neither a dev set nor an STS
set) with SmolLM2 in fp32 and with each int8 setting (``--alphas`` x the layer sets of ``--layer-sets``), then
compares: the mean cosine between a sentence's int8 and fp32 vectors, and, what STS depends on, the Spearman
correlation (x 100) between the fp32 and int8 cosines of ``--pairs`` seeded random sentence pairs. The setting
to use is chosen on these numbers, not on an STS dev score. With ``--senteval-dir`` it also scores the first
``--sts-pairs`` pairs of STS-B train and SICK train (no dev set) with fp32 and each int8 setting: the Spearman
change int8 makes on STS data, with its 95 % paired-bootstrap interval. A setting must keep that change within
the 0.2 asked of int8; closer pair similarities alone are not enough (the README's fp32-opening trial). Writes
``tests/benchmarks/results/int8_fidelity[-TAG].json``.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from common import save
from scipy.stats import spearmanr

from sempa_train.core.models import load_causal_lm
from sempa_train.core.templates import PROMPTEOL_TEMPLATE
from sempa_train.stages.embedding import PromptEOLEncoder, cosine
from sempa_train.stages.evaluation import paired_bootstrap, spearman100
from sempa_train.stages.quantize import QUANTIZED, quantize_int8
from sempa_train.stages.retention import held_out_texts
from sempa_train.stages.sts_data import STSSubset, load_senteval_task

# with_down_proj: down_proj's input is smoothed too (through up_proj), as quantize_int8 does whenever it is quantised
LAYER_SETS = {"default": QUANTIZED, "with_down_proj": (*QUANTIZED, "down_proj")}


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def sts_sets(senteval_dir: str, pairs: int) -> list[STSSubset]:
    """The first ``pairs`` pairs of STS-B train and SICK train."""
    sets = [load_senteval_task(senteval_dir, task, "train")[0] for task in ("STSBenchmark", "SICKRelatedness")]
    return [s.select(range(min(pairs, len(s)))) for s in sets]


def sts_similarities(encoder: PromptEOLEncoder, sets: list[STSSubset]) -> dict[str, np.ndarray]:
    return {s.task: cosine(encoder.encode(s.sent1), encoder.encode(s.sent2)) for s in sets}


def sts_changes(sets: list[STSSubset], reference: dict[str, np.ndarray], quantized: dict[str, np.ndarray]) -> dict:
    """Per STS set: fp32's and int8's Spearman, int8's change and its 95 % paired-bootstrap interval."""
    changes = {}
    for subset in sets:
        fp32_sims, int8_sims = reference[subset.task], quantized[subset.task]
        fp32_score, int8_score = spearman100(fp32_sims, subset.scores), spearman100(int8_sims, subset.scores)
        changes[f"{subset.task}_train"] = {
            "fp32_spearman": round(fp32_score, 2), "int8_spearman": round(int8_score, 2),
            "delta": round(int8_score - fp32_score, 2),
            "delta_ci95": [round(x, 2) for x in paired_bootstrap(subset.scores, fp32_sims, int8_sims)]}
    return changes


def pair_fidelity(reference: np.ndarray, pairs: int, seed: int = 0) -> Callable[[np.ndarray], dict[str, float]]:
    """A function of int8 vectors of the same sentences as ``reference`` (fp32): their mean cosine to fp32's, and
    the Spearman correlation (x 100) of ``pairs`` seeded random pair similarities with fp32's."""
    rng = np.random.default_rng(seed)
    left, right = rng.integers(0, len(reference), pairs), rng.integers(0, len(reference), pairs)

    def pair_cosines(vectors: np.ndarray) -> np.ndarray:
        normed = unit(vectors)
        return np.sum(normed[left] * normed[right], axis=1)

    reference_pairs = pair_cosines(reference)

    def fidelity(vectors: np.ndarray) -> dict[str, float]:
        return {"mean_cosine_to_fp32": round(float(np.mean(np.sum(unit(vectors) * unit(reference), axis=1))), 5),
                "pair_similarity_spearman_x100": round(100 * float(spearmanr(pair_cosines(vectors),
                                                                             reference_pairs)[0]), 3)}
    return fidelity


def add_reference_arguments(parser: argparse.ArgumentParser) -> None:
    """The text, model and STS sets int8 is compared with fp32 on (this script and int8_layer_sensitivity.py)."""
    parser.add_argument("--text", default="../shared/data/nli/snli/test.jsonl")
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=5000)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--sts-pairs", type=int, default=2000, help="pairs of each STS set (first N)")
    parser.add_argument("--tag", default="")


class Reference(NamedTuple):
    """fp32's side of the comparison: the model, the sentences, how close other vectors of them are to fp32's, and
    fp32's similarities on the STS sets."""
    model: Any
    tokenizer: Any
    sentences: list[str]
    fidelity: Callable[[np.ndarray], dict[str, float]]
    sets: list[STSSubset]
    sts: dict[str, np.ndarray]


def fp32_reference(args: argparse.Namespace) -> Reference:
    sentences = held_out_texts(args.text, args.sentences)
    model, tokenizer = load_causal_lm(args.model, dtype=torch.float32)
    fp32 = PromptEOLEncoder(model, tokenizer, batch_size=64, show_progress=False)
    sets = sts_sets(args.senteval_dir, args.sts_pairs) if args.senteval_dir else []
    return Reference(model, tokenizer, sentences, pair_fidelity(fp32.encode(sentences), args.pairs), sets,
                     sts_similarities(fp32, sets))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reference_arguments(parser)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.65, 0.8, 0.9])
    parser.add_argument("--layer-sets", nargs="+", default=["default"], choices=sorted(LAYER_SETS))
    parser.add_argument("--senteval-dir", default=None, help="also score STS-B train and SICK train from here")
    args = parser.parse_args()

    model, tokenizer, sentences, fidelity, sets, reference_sts = fp32_reference(args)
    rows = []
    for layer_set in args.layer_sets:
        for alpha in args.alphas:
            start = time.perf_counter()
            quantized = quantize_int8(copy.deepcopy(model), tokenizer, template=PROMPTEOL_TEMPLATE, alpha=alpha,
                                      names=LAYER_SETS[layer_set])
            int8 = PromptEOLEncoder(quantized, tokenizer, batch_size=64, show_progress=False)
            row = {"layers": layer_set, "alpha": alpha, **fidelity(int8.encode(sentences)),
                   "seconds": round(time.perf_counter() - start, 1)}
            row.update(sts_changes(sets, reference_sts, sts_similarities(int8, sets)))
            print(row, flush=True)
            rows.append(row)
    best = max(rows, key=lambda r: r["pair_similarity_spearman_x100"])
    save("int8_fidelity", {"text": args.text, "sentences": len(sentences), "pairs": args.pairs, "model": args.model,
                           "sts_sets": {s.task: len(s.scores) for s in sets}, "rows": rows, "best": best}, tag=args.tag)


if __name__ == "__main__":
    main()
