"""Where int8 PromptEOL's error comes from, split into activation and weight rounding, and which splits this CPU's
int8 products can compute exactly.

    python tests/benchmarks/int8_error_sources.py            # run it under the AVX2 cap to describe such a CPU

Two parts, both on the machine at hand:

1. *Exact ranges of* ``torch._int_mm``: random int8 activations and weights drawn from the ranges below, the
   largest difference from the exact product. Without int8 dot-product instructions oneDNN multiplies
   (activation + 128) by the weight in pairs summed into int16, so only ranges whose pair sums stay within
   32,767 are exact: 8-bit activations with 7-bit weights (what ``Int8Linear`` uses there), or activations in
   [-128, -1] (7 bits, shifted) with 8-bit weights.
2. *Fidelity of each split*: the encoder ``quantize_int8`` builds (smoothed, the same layers), with every int8
   projection replaced by a fake-quantised one (rounding to the grid in fp32, so a split this CPU cannot compute
   exactly can still be measured), scored as ``int8_fidelity.py`` scores int8: pair similarities on ``--sentences``
   SNLI-test premises against fp32's. Splits: activations per token in 8 or 7 bits (symmetric, or 7-bit
   asymmetric with a zero point) or exact, times weights per output channel in 7, 8 or 12 bits or exact; for the
   default layers and for the default layers plus down_proj. The real ``Int8Linear`` encoder is scored too, to
   show how closely the fake one follows it.

It answers whether another way of filling the 15 bits that a pair sum allows would bring down_proj into int8,
which is what the 4x embedding target needs on such a CPU. About 11 min on 2 cores. Writes
``tests/benchmarks/results/int8_error_sources[-TAG].json``.
"""

from __future__ import annotations

import argparse
import copy
from typing import NamedTuple

import torch
from common import save
from int8_fidelity import LAYER_SETS, add_reference_arguments, fp32_reference

from sempa_train.core.templates import PROMPTEOL_TEMPLATE
from sempa_train.stages.embedding import PromptEOLEncoder
from sempa_train.stages.quantize import Int8Linear, quantize_int8, quantize_rows, weight_grid

# (activation range, weight range) pairs for part 1, inclusive.
RANGES = [((-128, 127), (-127, 127)), ((-128, 127), (-63, 63)), ((-128, -1), (-128, 127)), ((0, 127), (-127, 127))]


class Split(NamedTuple):
    """How a projection rounds: activation levels per token (None: exact), asymmetric or not, weight levels."""
    activation_levels: int | None
    asymmetric: bool
    weight_levels: int | None


SPLITS = {
    "a8w7": Split(127, False, 63),    # Int8Linear on a CPU without int8 dot products
    "a7w8": Split(63, False, 127),    # the other exact split there (activations shifted into [-128, -1])
    "a7asym_w8": Split(127, True, 127),  # 7-bit activations with a per-token zero point: 128 levels
    "a8w8": Split(127, False, 127),   # Int8Linear with int8 dot products (VNNI, AMX)
    "a8w12": Split(127, False, 2047),  # exact only in a product of our own (int16 pairs summed into int32)
    "a8_exact_weights": Split(127, False, None),
    "exact_activations_w7": Split(None, False, 63),
}


class FakeQuantLinear(torch.nn.Module):
    """A linear layer whose input (per token) and weights (per output channel) are rounded to ``split``'s grids
    and computed in fp32: the values an exact integer product would give, whatever this CPU can compute."""

    def __init__(self, linear: torch.nn.Linear, split: Split) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        if split.weight_levels is not None:
            levels, scale = weight_grid(weight, split.weight_levels)
            weight = levels * scale[:, None]
        self.weight, self.split = weight, split
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def round_activations(self, rows: torch.Tensor) -> torch.Tensor:
        levels = self.split.activation_levels
        if levels is None:
            return rows
        if self.split.asymmetric:
            low = rows.amin(1, keepdim=True)
            step = ((rows.amax(1, keepdim=True) - low) / levels).clamp(min=1e-8)
            zero = torch.round(-low / step)
            return ((rows / step).round() + zero).clamp(0, levels).sub(zero) * step
        integers, scale = quantize_rows(rows, levels)
        return integers.float() * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(self.round_activations(x.reshape(-1, x.shape[-1])), self.weight, self.bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def keep_fp32_weights() -> None:
    """Make every ``Int8Linear`` remember the (smoothed) fp32 layer it was made from, as ``.source``."""
    make = Int8Linear.__init__

    def init(self: Int8Linear, linear: torch.nn.Linear, *args: object, **kwargs: object) -> None:
        make(self, linear, *args, **kwargs)
        self.__dict__["source"] = linear  # not a submodule: the encoder never runs it

    Int8Linear.__init__ = init  # type: ignore[method-assign]


def fake_quantized(model: torch.nn.Module, split: Split) -> torch.nn.Module:
    """A copy of an int8 model with each ``Int8Linear`` replaced by a ``FakeQuantLinear`` of its source."""
    model = copy.deepcopy(model)
    for block in model.get_decoder().layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, Int8Linear):
                    setattr(parent, name, FakeQuantLinear(child.source, split))
    return model


def exact_ranges(rows: int = 256, inner: int = 1536, cols: int = 576) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    report = []
    for (a_low, a_high), (w_low, w_high) in RANGES:
        a = torch.randint(a_low, a_high + 1, (rows, inner), dtype=torch.int8, generator=generator)
        w = torch.randint(w_low, w_high + 1, (inner, cols), dtype=torch.int8, generator=generator)
        error = (torch._int_mm(a, w).double() - a.double() @ w.double()).abs().max().item()
        report.append({"activations": [a_low, a_high], "weights": [w_low, w_high], "max_abs_error": error})
        print(report[-1], flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reference_arguments(parser)
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.set_defaults(senteval_dir=None)
    args = parser.parse_args()

    ranges = exact_ranges()
    keep_fp32_weights()
    model, tokenizer, sentences, fidelity, _, _ = fp32_reference(args)
    rows = []
    for layer_set in ("default", "with_down_proj"):
        int8 = quantize_int8(copy.deepcopy(model), tokenizer, template=PROMPTEOL_TEMPLATE, names=LAYER_SETS[layer_set])
        for name in ["Int8Linear (this CPU)", *args.splits]:
            quantized = int8 if name not in SPLITS else fake_quantized(int8, SPLITS[name])
            encoder = PromptEOLEncoder(quantized, tokenizer, batch_size=64, show_progress=False)
            rows.append({"layers": layer_set, "split": name, **fidelity(encoder.encode(sentences))})
            print(rows[-1], flush=True)
    save("int8_error_sources", {"text": args.text, "sentences": len(sentences), "pairs": args.pairs,
                                "model": args.model, "int_mm_exact_ranges": ranges,
                                "splits": {name: SPLITS[name]._asdict() for name in args.splits}, "rows": rows},
         tag=args.tag)


if __name__ == "__main__":
    main()
