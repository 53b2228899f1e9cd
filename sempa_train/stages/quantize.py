"""int8 PromptEOL on CPU: SmoothQuant-style smoothing, then int8 linear layers with per-token activation scales.

Plain dynamic int8 (``torch.ao.quantization.quantize_dynamic``: per-channel int8 weights, one activation
scale per batch) collapses SmolLM2's STS-B dev Spearman (79 → 22 on 400 pairs): a few input channels of
the projections carry activations 100x larger than the rest, and one scale per batch cannot hold both.
Smoothing (Xiao et al., 2023, "SmoothQuant") moves that range into the weights, exactly: for a linear
layer fed by an RMSNorm, input channel ``j`` is divided by ``s_j`` (folded into the norm's weight) and
the weights' column ``j`` multiplied by it, with ``s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)`` from the
activation maxima of a fixed calibration text. The smoothed fp32 model computes the same function; only
then are the q/k/v, o and gate/up projections replaced by ``Int8Linear`` (o_proj without smoothing: its
input is the attention output, not behind a norm, and it held its accuracy as it is). down_proj stays
fp32 unless asked for (``names``): its input, SiLU(gate) x up, has the widest range; with one activation scale
per batch quantising it lost 20 points, and with per-token scales it still follows fp32 less closely than the
rest (tests/benchmarks/int8_fidelity.py), even smoothed (through up_proj's output channels, exact because
SiLU(gate) x up is linear in up; done whenever down_proj is quantised), and in none of the sets of layers tried
(the 10-30 where it costs least) did it keep STS scores within 0.15 (``down_proj_layers``;
tests/benchmarks/int8_layer_sensitivity.py). ``Int8Linear`` scales each token (row) of its input by itself, so
a vector does not depend on the batch it is in, and one token's large values do not coarsen its neighbours'
steps; q/k/v, and gate/up, quantise the input they share once.

The calibration text is fixed (the 50 sentences of ``data/heldout_text.txt`` and the 64 premises of
``data/nli_sample.jsonl``: plain prose and captions), never the data being encoded, so the quantised model
is the same whatever corpus it encodes. Measured on STS-B dev (README's embedding benchmark, fp32 73.83):
alpha 0.65, 73.56 at 4.06x the plain fp32 loop's speed on Zen 4; with the instruction set capped to AVX2 (7-bit
weights, below) 73.69 at 3.45x; on a real AVX2-only EPYC, on FBGEMM's product (``int8_kernels``), 73.59 at
3.11x; alpha 0.8 gave 74.12 at 4.33x, and one activation scale per batch (the first
version, over ``quantize_dynamic``) 73.25 at 4.21x. Early probes that calibrated in padded batches,
which let padding positions into the maxima, scattered between -0.45 and +0.32 with the calibration text:
the smoothing factors are that sensitive.
"""

from __future__ import annotations

import copy
import json
import logging
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sempa_train.stages import int8_kernels
from sempa_train.stages.int8_kernels import scale_rows

log = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parents[2] / "data"
CALIBRATION_FILES = (DATA / "heldout_text.txt", DATA / "nli_sample.jsonl")  # one sentence a line; NLI premises
# How much of the activation range moves into the weights: the setting whose pair similarities follow fp32 most
# closely on 1,000 SNLI-test premises among 0.5/0.65/0.8/0.9 (tests/benchmarks/int8_fidelity.py; no STS score).
ALPHA = 0.65
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
# The decoder layers whose down_proj is in int8 as well: none. Under an AVX2 cap none of the sets tried (the 10-30
# layers where it costs least) kept STS-B train and SICK train within 0.15 (tests/benchmarks/int8_layer_sensitivity.py).
DOWN_PROJ_LAYERS: tuple[int, ...] = ()
# Part of the key of cached int8 results: raise it when the same config starts to compute other vectors.
# 2: the template's opening in fp32 (5e37c21; reverted in 73448a6, it moved STS scores +0.5 to +0.85 from fp32's);
# 3: the int8 opening again, as before the key carried a version; 4: calibrated on every position of the final layer
# again (b726d0a-2bae01d calibrated its q/k/v and gate/up on the last position only).
INT8_VERSION = 4


def calibration_sentences(files: Sequence[Path] = CALIBRATION_FILES) -> list[str]:
    """The distinct sentences of the calibration files, in order (a .jsonl file gives its ``premise`` fields)."""
    sentences: list[str] = []
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: a calibration text of int8 PromptEOL is missing")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        sentences += [json.loads(line)["premise"] for line in lines] if path.suffix == ".jsonl" else lines
    return list(dict.fromkeys(sentences))


def input_maxima(model: Any, encode: Callable[[Sequence[str]], Any], sentences: Sequence[str],
                 names: Sequence[str] = ("q_proj", "gate_proj")) -> dict[str, torch.Tensor]:
    """Per-input-channel max |activation| of the named linear layers of every decoder layer, over ``encode``."""
    maxima: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.get_decoder().layers.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in names:
            def record(module: Any, inputs: tuple[torch.Tensor, ...], output: Any, name: str = name) -> None:
                x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0).float()
                maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
            hooks.append(module.register_forward_hook(record))
    try:
        encode(sentences)
    finally:
        for hook in hooks:
            hook.remove()
    return maxima


def _smoothing_scale(linears: Sequence[torch.nn.Linear], act_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel ``s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)`` over ``linears``' columns."""
    weight_max = torch.stack([linear.weight.abs().amax(0) for linear in linears]).amax(0).clamp(min=1e-5)
    return (act_max.clamp(min=1e-5) ** alpha / weight_max ** (1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def _smooth(norm: torch.nn.Module, linears: Sequence[torch.nn.Linear], act_max: torch.Tensor, alpha: float) -> None:
    scale = _smoothing_scale(linears, act_max, alpha)
    norm.weight.div_(scale)
    for linear in linears:
        linear.weight.mul_(scale)


@torch.no_grad()
def _smooth_down(up: torch.nn.Linear, down: torch.nn.Linear, act_max: torch.Tensor, alpha: float) -> None:
    """down_proj's input is SiLU(gate) x up, linear in up's output: dividing up's output channel ``j`` by
    ``s_j`` and multiplying down's input column ``j`` by it leaves the MLP's function unchanged."""
    scale = _smoothing_scale([down], act_max, alpha)
    up.weight.div_(scale[:, None])
    if up.bias is not None:
        up.bias.div_(scale)
    down.weight.mul_(scale)


def smooth(model: Any, maxima: dict[str, torch.Tensor], alpha: float = ALPHA) -> Any:
    """A copy of ``model`` with every layer's q/k/v and gate/up inputs smoothed, and down_proj's input too where
    ``maxima`` has it (the same function in fp32)."""
    model = copy.deepcopy(model)
    for i, layer in enumerate(model.get_decoder().layers):
        attention, mlp = layer.self_attn, layer.mlp
        _smooth(layer.input_layernorm, [attention.q_proj, attention.k_proj, attention.v_proj],
                maxima[f"{i}.self_attn.q_proj"], alpha)
        _smooth(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], maxima[f"{i}.mlp.gate_proj"], alpha)
        if f"{i}.mlp.down_proj" in maxima:
            _smooth_down(mlp.up_proj, mlp.down_proj, maxima[f"{i}.mlp.down_proj"], alpha)
    return model


def quantize_rows(x: torch.Tensor, levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as int8 rows (tokens) in ``+-levels`` with one fp32 scale per row: ``(rows, in)`` int8 and
    ``(rows, 1)`` scales."""
    scaled, scale = scale_rows(x, levels)
    return int8_kernels.OneDNN.prepare(scaled), scale


def weight_grid(weight: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (out, in) rounded per output channel to the integers in ``+-levels`` (still fp32, so a grid
    finer than int8 can be measured too), with the ``(out,)`` scales that map them back."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(1) / levels).clamp(min=1e-8)
    return (weight / scale[:, None]).round().clamp(-levels, levels), scale


class SharedInput:
    """Quantises an input once for all the int8 layers that read it (q/k/v read one normed input, gate/up
    another): it keeps the last input's rows, as its kernel takes them, while that tensor is alive, and knows
    it by identity."""

    def __init__(self, kernel: str | None = None) -> None:
        self.kernel = kernel or int8_kernels.chosen()
        self.prepare = int8_kernels.KERNELS[self.kernel].prepare
        self._input: weakref.ref | None = None
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None or self._input is None or self._input() is not x:
            scaled, scale = scale_rows(x)
            self._rows = self.prepare(scaled), scale
            self._input = weakref.ref(x, self._forget)
        return self._rows

    def _forget(self, _: weakref.ref) -> None:
        self._input, self._rows = None, None


class Int8Linear(torch.nn.Module):
    """A linear layer computed in int8: weights quantised once per output channel, activations per token at
    each call (each row its own scale, so one token's large values do not coarsen the others'), the product
    accumulated in int32 by the int8 kernel chosen for this CPU (``int8_kernels``) and rescaled to fp32.
    ``weight_levels`` is the largest integer a weight may take: 127, or 63 where the kernel adds pairs of
    (activation + 128) x weight products in int16 (no int8 dot-product instructions it uses) and full-range
    weights overflow it (255 x 127 x 2 > 32767; with 7-bit weights the product is exact: tests/test_embedding.py
    checks both kernels in an AVX2-capped process; by default ``int8_kernels.weight_levels`` of the kernel). Layers
    given one ``shared`` quantiser quantise an input they all read once, on its kernel; ``kernel`` names one
    otherwise (default: ``int8_kernels.chosen()``)."""

    def __init__(self, linear: torch.nn.Linear, weight_levels: int | None = None, shared: SharedInput | None = None,
                 kernel: str | None = None) -> None:
        super().__init__()
        if shared is not None and kernel not in (None, shared.kernel):
            raise ValueError(f"kernel {kernel!r}: the shared quantiser prepares rows for {shared.kernel!r}")
        self.quantize = shared or SharedInput(kernel)
        levels, scale = weight_grid(linear.weight, weight_levels or int8_kernels.weight_levels(self.quantize.kernel))
        self.register_buffer("weight_t", levels.to(torch.int8).t().contiguous())  # (in, out)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float(),
                                                                        requires_grad=False)
        self.product = int8_kernels.make(self.weight_t, self.quantize.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, scale = self.quantize(x)
        # the row and the channel scales in place: no (rows x out) scale matrix
        out = self.product(rows).mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def quantize_int8(model: Any, tokenizer: Any, *, template: str, layer: int = -1, alpha: float = ALPHA,
                  sentences: Sequence[str] | None = None, names: Sequence[str] = QUANTIZED,
                  down_proj_layers: Sequence[int] = DOWN_PROJ_LAYERS, kernel: str | None = None) -> Any:
    """The smoothed model with its ``names`` projections in int8 (``Int8Linear``, CPU, on ``kernel``; default
    ``int8_kernels.chosen()``) in every decoder layer, and down_proj too in the layers ``down_proj_layers`` lists,
    calibrated by running PromptEOL (``template``, ``layer``) on ``sentences`` one a batch (padding positions would
    enter the activation maxima with values no real token has) and every layer at every position."""
    from sempa_train.stages.embedding import PromptEOLEncoder

    blocks = model.get_decoder().layers
    if unknown := set(down_proj_layers) - set(range(len(blocks))):
        raise ValueError(f"down_proj_layers {sorted(unknown)}: the model has decoder layers 0-{len(blocks) - 1}")
    down = set(range(len(blocks))) if "down_proj" in names else set(down_proj_layers)
    sentences = list(sentences) if sentences is not None else calibration_sentences()
    # The full final layer: with PromptEOL's last-position shortcut its q_proj and gate_proj would see the last
    # position only, while its k_proj and v_proj, smoothed by the same factors, read every position.
    calibrate = PromptEOLEncoder(model, tokenizer, template=template, layer=layer, batch_size=1,
                                 show_progress=False, last_position=False).encode
    maxima = input_maxima(model, calibrate, sentences, ("q_proj", "gate_proj", "down_proj") if down
                          else ("q_proj", "gate_proj"))
    maxima = {key: value for key, value in maxima.items()
              if not key.endswith("down_proj") or int(key.split(".", 1)[0]) in down}
    smoothed = smooth(model, maxima, alpha)
    kernel = kernel or int8_kernels.chosen()
    levels = int8_kernels.weight_levels(kernel)
    count = 0
    for i, block in enumerate(smoothed.get_decoder().layers):
        wanted = {*names, "down_proj"} if i in down else set(names)
        attention_input, mlp_input = SharedInput(kernel), SharedInput(kernel)
        shared = {"q_proj": attention_input, "k_proj": attention_input, "v_proj": attention_input,
                  "gate_proj": mlp_input, "up_proj": mlp_input}
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if name in wanted and isinstance(child, torch.nn.Linear):
                    setattr(parent, name, Int8Linear(child, shared=shared.get(name), kernel=kernel))
                    count += 1
    log.info("int8 PromptEOL: %d linear layers quantised after smoothing (alpha %.2f, %d calibration sentences, "
             "down_proj in %d of %d layers, %s kernel, weights in +-%d%s)", count, alpha, len(sentences), len(down),
             len(blocks), kernel, levels, "" if levels == 127 else ": its int8 products sum int16 pairs here")
    return smoothed
