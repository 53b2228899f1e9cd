"""Which int8 matrix product ``Int8Linear`` runs on this CPU: oneDNN's, unless it is measured to be far slower.

An x86 build of torch has two: oneDNN's (``torch._int_mm``) and FBGEMM's (the quantized linear ops). On the Zen 4
and Sapphire Rapids CPUs measured here oneDNN's is fast; on a 2-core AMD EPYC with AVX2 only (no AVX-512, no
VNNI) it ran as a reference loop, 43x slower than fp32 on the probe below (and exact, where oneDNN's vector
kernels sum int16 pairs that can saturate), while FBGEMM's was 1.57x faster than fp32 there
(tests/benchmarks/results/embed_throughput-epyc-avx2.json). No CPU flag told the machines apart, so the first
int8 model of a process times both on a PromptEOL-sized product (about a second; longer where one is that slow).
The probe finds a slow path, but it does not rank two fast ones: on a Zen 4 with every library capped to AVX2,
one-off probes put either ahead (FBGEMM by up to 1.5x), while whole STS-B dev encodes were faster with oneDNN
(61.6 s against 65.0 s, tests/benchmarks/results/embed_throughput-avx2-capped-kernels.json). So oneDNN's, the
kernel every earlier int8 result was measured on, stays unless another is ``SWITCH_FACTOR`` times faster;
``SEMPA_INT8_KERNEL=onednn|fbgemm`` skips the measurement. Both sum the products of the activations, rounded per
row (token) to ``+-levels``, and the int8 weights exactly; the caller rescales. FBGEMM rounds an activation after
adding its zero point (128) in fp32, so a value within about 1e-5 of a half step can round the other way (4 in
295,000 in a probe): enough to move STS-B dev by 0.17 (73.59 against 73.76 under the AVX2 caps), so cached int8
results name the kernel.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from collections.abc import Callable

import torch

from sempa_train.core.models import cpu_flags, cpu_has_int8_dot

log = logging.getLogger(__name__)

ENV = "SEMPA_INT8_KERNEL"
# The product the choice is timed on: a batch of 256 tokens through SmolLM2-135M's gate_proj (576 -> 1536).
PROBE_SHAPE = (256, 576, 1536)
DEFAULT = "onednn"
# How much faster than oneDNN's another kernel must be on the probe to replace it: more than the probe's error in
# ranking fast kernels (above), far less than the reference loop's 68x against FBGEMM.
SWITCH_FACTOR = 2.0


def scale_rows(x: torch.Tensor, levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as fp32 rows (tokens) scaled into ``+-levels``, one scale per row: ``(rows, in)`` and ``(rows, 1)``
    scales that map them back. Rounding is the kernel's."""
    rows = x.reshape(-1, x.shape[-1]).float()
    scale = rows.abs().amax(1, keepdim=True).div_(levels).clamp_(min=1e-8)  # (linalg's inf-norm: far slower)
    return torch.div(rows, scale), scale


class OneDNN:
    """``torch._int_mm``: int8 rows times int8 weights into int32."""

    name = "onednn"

    def __init__(self, weight_t: torch.Tensor) -> None:
        self.weight_t = weight_t  # (in, out) int8: _int_mm's fastest layout

    @staticmethod
    def prepare(scaled: torch.Tensor) -> torch.Tensor:
        return scaled.round_().to(torch.int8)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._int_mm(rows, self.weight_t).float()


class FBGEMM:
    """FBGEMM's quantized linear with fp32 output: it rounds the scaled rows itself (as uint8 around 128, scale
    1) and, with every weight scale 1, returns the integer sums as fp32."""

    name = "fbgemm"

    def __init__(self, weight_t: torch.Tensor) -> None:
        out_features = weight_t.shape[1]
        with warnings.catch_warnings():  # quantized tensors are deprecated (torch 2.13 still has them): the only
            warnings.simplefilter("ignore", UserWarning)  # way into FBGEMM's packed weights
            weight = torch._make_per_channel_quantized_tensor(
                weight_t.t().contiguous(), torch.ones(out_features, dtype=torch.double),
                torch.zeros(out_features, dtype=torch.long), 0)
        self.packed = torch.ops.quantized.linear_prepack(weight, None)

    @staticmethod
    def prepare(scaled: torch.Tensor) -> torch.Tensor:
        return scaled

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(rows, 1.0, 128, self.packed)


Kernel = OneDNN | FBGEMM
KERNELS: dict[str, type[OneDNN] | type[FBGEMM]] = {"onednn": OneDNN, "fbgemm": FBGEMM}


def available() -> list[str]:
    """The kernels this build of torch has (FBGEMM only on x86, and only while torch keeps its quantized ops)."""
    fbgemm = ("fbgemm" in torch.backends.quantized.supported_engines
              and hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"))
    return ["onednn", *(["fbgemm"] if fbgemm else [])]


def _seconds(run: Callable[[], object], repeats: int, timer: Callable[[], float]) -> float:
    """Best of ``repeats`` timings after one warm-up call; one timing only when the warm-up took over 0.1 s."""
    start = timer()
    run()
    first = timer() - start
    if first > 0.1:
        start = timer()
        run()
        return timer() - start
    best = float("inf")
    for _ in range(repeats):
        start = timer()
        run()
        best = min(best, timer() - start)
    return best


def measure(kernels: list[str] | None = None, shape: tuple[int, int, int] = PROBE_SHAPE, repeats: int = 5,
            timer: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Seconds per ``shape`` (tokens, in, out) product for each kernel, scaling and rounding included, and for
    the fp32 product it replaces (``"fp32"``)."""
    tokens, in_features, out_features = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    weight_t = torch.randint(-63, 64, (in_features, out_features), dtype=torch.int8, generator=generator)
    times = {"fp32": _seconds(lambda: torch.nn.functional.linear(x, weight), repeats, timer)}
    with torch.no_grad():
        for name in kernels or available():
            kernel = KERNELS[name](weight_t)
            times[name] = _seconds(lambda kernel=kernel: kernel(kernel.prepare(scale_rows(x, 127)[0])),
                                   repeats, timer)
    return times


def choose(times: dict[str, float]) -> str:
    """oneDNN's kernel unless another in ``times`` (which also holds fp32's) is ``SWITCH_FACTOR`` times faster,
    with the reason in the log; a warning when the kernel chosen is no faster than fp32."""
    kernels = {name: seconds for name, seconds in times.items() if name != "fp32"}
    best = min(kernels, key=kernels.__getitem__)
    pick = best if DEFAULT not in kernels or kernels[best] * SWITCH_FACTOR < kernels[DEFAULT] else DEFAULT
    readings = ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in times.items())
    tokens, in_features, out_features = PROBE_SHAPE
    if pick == DEFAULT:
        why = f"no other is {SWITCH_FACTOR:g}x faster here"
    else:
        why = f"{DEFAULT}'s is {kernels[DEFAULT] / kernels[pick]:.0f}x slower here" if DEFAULT in kernels \
            else f"this torch has no {DEFAULT} kernel"
    log.info("int8 kernel: %s (%s on a %dx%dx%d product: %s)", pick, why, tokens, in_features, out_features,
             readings)
    if kernels[pick] >= times["fp32"]:
        log.warning("int8 products are no faster than fp32 on this CPU (%s): quantize=none would be as fast "
                    "and exact", readings)
    return pick


@functools.cache
def probe_times() -> dict[str, float]:
    """This process's ``measure()`` readings, taken once: what ``chosen()`` decides on and benchmarks record."""
    return measure()


@functools.cache
def chosen() -> str:
    """The kernel of this process: ``SEMPA_INT8_KERNEL`` when set, otherwise measured once (``probe_times``)."""
    if wanted := os.environ.get(ENV):
        if wanted not in available():
            raise ValueError(f"{ENV}={wanted!r}: this torch has the int8 kernels {', '.join(available())}")
        log.info("int8 kernel: %s (%s)", wanted, ENV)
        return wanted
    return choose(probe_times())


def weight_levels(name: str) -> int:
    """The largest integer a weight may take for kernel ``name`` to sum its products exactly: 127 where it
    multiplies int8 straight into int32 (oneDNN with VNNI, AVX-VNNI or AMX; FBGEMM with AVX512-VNNI only, and
    not under an ``FBGEMM_ENABLE_INSTRUCTIONS`` cap below it), 63 where it sums pairs of (activation + 128) x
    weight products in int16 first, which full-range weights overflow (255 x 127 x 2 > 32767)."""
    if name == "fbgemm":
        fbgemm_isa = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "AVX512_E1").upper()
        return 127 if "avx512_vnni" in cpu_flags() and fbgemm_isa.startswith("AVX512_E1") else 63
    return 127 if cpu_has_int8_dot() else 63


def make(weight_t: torch.Tensor, name: str | None = None) -> Kernel:
    """The product with the int8 weights ``weight_t`` (in, out) on kernel ``name`` (default: ``chosen()``)."""
    return KERNELS[name or chosen()](weight_t)
