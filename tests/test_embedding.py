import copy
import logging
import os

import numpy as np
import pytest
import torch

from sempa_train.core.config import EmbedConfig
from sempa_train.core.models import load_causal_lm
from sempa_train.core.templates import PROMPTEOL_TEMPLATE
from sempa_train.stages import int8_kernels
from sempa_train.stages.embedding import PromptEOLEncoder, common_prefix, cosine, load_encoder

SENTENCES = [
    "A man is playing a guitar on the street.",
    "A dog runs.",
    "Two children are building a sandcastle near the water while their parents watch?",
    "A dog runs.",
    'She said "yes"',
]


def reference_embeddings(model, tokenizer, sentences):
    """PromptEOL the slow, obvious way: one sentence at a time, full model, hidden_states[-1][:, -1]."""
    enc = PromptEOLEncoder(model, tokenizer)
    out = []
    with torch.no_grad():
        for prompt in enc.prompts(sentences):
            ids = tokenizer(prompt, return_tensors="pt")
            out.append(model(**ids, output_hidden_states=True).hidden_states[-1][0, -1].float().numpy())
    return np.stack(out)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(tiny_model_dir, dtype=torch.float32)


def test_batched_sorted_dedup_equals_one_by_one(tiny):
    model, tokenizer = tiny
    expected = reference_embeddings(model, tokenizer, SENTENCES)
    got = PromptEOLEncoder(model, tokenizer, batch_size=2, show_progress=False).encode(SENTENCES)
    assert got.shape == (5, 128) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)  # left padding does not change results
    np.testing.assert_array_equal(got[1], got[3])


def test_shared_prefix_cache_changes_nothing(tiny):
    model, tokenizer = tiny
    shared = PromptEOLEncoder(model, tokenizer, batch_size=2, show_progress=False)
    full = PromptEOLEncoder(model, tokenizer, batch_size=2, show_progress=False, share_prefix=False)
    np.testing.assert_allclose(shared.encode(SENTENCES), full.encode(SENTENCES), rtol=1e-4, atol=1e-5)
    layer1 = [PromptEOLEncoder(model, tokenizer, layer=1, show_progress=False, share_prefix=share).encode(SENTENCES)
              for share in (True, False)]
    np.testing.assert_allclose(*layer1, rtol=1e-4, atol=1e-5)


def test_last_position_only_changes_nothing_and_restores_the_layer(tiny):
    """The final layer computed at the last position only gives the full layer's vectors, with and without the
    shared prefix and left padding, in fp32 and int8; the model's own layer is back afterwards."""
    from sempa_train.stages.last_position import LastPositionLayer, last_position_only
    from sempa_train.stages.quantize import quantize_int8

    model, tokenizer = tiny
    int8 = quantize_int8(copy.deepcopy(model), tokenizer, template=PROMPTEOL_TEMPLATE, sentences=SENTENCES)
    for lm in (model, int8):
        for share in (True, False):
            fast, full = (PromptEOLEncoder(lm, tokenizer, batch_size=3, show_progress=False, share_prefix=share,
                                           last_position=last).encode(SENTENCES) for last in (True, False))
            np.testing.assert_allclose(fast, full, rtol=1e-4, atol=1e-5)
    last = model.model.layers[-1]
    with last_position_only(model.model) as swapped:
        assert swapped and isinstance(model.model.layers[-1], LastPositionLayer)
    assert model.model.layers[-1] is last


def test_smoothing_is_exact_and_int8_stays_close(tiny, tiny_model_dir):
    """quantize=int8: smoothing alone computes the same vectors; after int8 they stay close to fp32."""
    from sempa_train.stages.quantize import input_maxima, smooth

    model, tokenizer = tiny
    fp32 = PromptEOLEncoder(model, tokenizer, show_progress=False).encode(SENTENCES)
    maxima = input_maxima(model, PromptEOLEncoder(model, tokenizer, show_progress=False).encode, SENTENCES)
    assert len(maxima) == 2 * model.config.num_hidden_layers
    smoothed = smooth(model, maxima)
    q_proj = [m.model.layers[0].self_attn.q_proj.weight for m in (smoothed, model)]
    assert not torch.equal(*q_proj)
    np.testing.assert_allclose(PromptEOLEncoder(smoothed, tokenizer, show_progress=False).encode(SENTENCES), fp32,
                               rtol=1e-3, atol=1e-4)
    # down_proj's input is smoothed through up_proj's output channels: still the same function
    maxima = input_maxima(model, PromptEOLEncoder(model, tokenizer, show_progress=False).encode, SENTENCES,
                          ("q_proj", "gate_proj", "down_proj"))
    smoothed = smooth(model, maxima)
    down = [m.model.layers[0].mlp.down_proj.weight for m in (smoothed, model)]
    assert not torch.equal(*down)
    np.testing.assert_allclose(PromptEOLEncoder(smoothed, tokenizer, show_progress=False).encode(SENTENCES), fp32,
                               rtol=1e-3, atol=1e-4)

    int8 = load_encoder(tiny_model_dir, EmbedConfig(quantize="int8"), show_progress=False)
    from sempa_train.stages.quantize import Int8Linear

    mlp = int8.model.model.layers[0].mlp
    assert isinstance(mlp.gate_proj, Int8Linear) and isinstance(mlp.down_proj, torch.nn.Linear)
    assert cosine(int8.encode(SENTENCES), fp32).min() > 0.99
    with pytest.raises(ValueError, match="applies to the transformers backend"):
        EmbedConfig(backend="vllm", quantize="int8")


def test_down_proj_in_int8_only_in_the_layers_asked_for(tiny):
    from sempa_train.stages.quantize import Int8Linear, quantize_int8

    model, tokenizer = tiny
    quantized = quantize_int8(copy.deepcopy(model), tokenizer, template=PROMPTEOL_TEMPLATE, sentences=SENTENCES,
                              down_proj_layers=[1])
    kinds = [(type(block.mlp.down_proj), type(block.mlp.up_proj)) for block in quantized.model.layers]
    assert kinds == [(torch.nn.Linear, Int8Linear), (Int8Linear, Int8Linear)]
    # only the quantised layer's down_proj input was smoothed (through up_proj)
    assert torch.equal(quantized.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)
    with pytest.raises(ValueError, match="down_proj_layers \\[5\\]: the model has decoder layers 0-1"):
        quantize_int8(model, tokenizer, template=PROMPTEOL_TEMPLATE, sentences=SENTENCES, down_proj_layers=[5])


def test_int8_calibration_reads_every_position_of_the_final_layer(tiny, monkeypatch):
    """The final layer's k/v read every position, so its smoothing factors come from every position's maxima, not
    from the last position that PromptEOL's shortcut computes q_proj and the MLP at."""
    from sempa_train.stages import quantize

    model, tokenizer = tiny
    used, original = {}, quantize.input_maxima

    def record(*args, **kwargs):
        used.update(original(*args, **kwargs))
        return used

    monkeypatch.setattr(quantize, "input_maxima", record)
    quantize.quantize_int8(copy.deepcopy(model), tokenizer, template=PROMPTEOL_TEMPLATE, sentences=SENTENCES)
    final = f"{model.config.num_hidden_layers - 1}.self_attn.q_proj"
    maxima = {last: original(model, PromptEOLEncoder(model, tokenizer, batch_size=1, show_progress=False,
                                                     last_position=last).encode, SENTENCES)[final]
              for last in (True, False)}
    assert torch.equal(used[final], maxima[False])
    assert not torch.equal(maxima[True], maxima[False])  # the shortcut would have seen less


@pytest.mark.parametrize("kernel", int8_kernels.available())
def test_int8_linear_scales_each_token_by_itself(kernel):
    """A token with values 100x larger does not coarsen its neighbours' int8 steps (one scale per row), on
    every int8 kernel this torch has."""
    from sempa_train.stages.quantize import Int8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    int8 = Int8Linear(linear, kernel=kernel)
    x = torch.randn(2, 3, 64)
    x[0, 0] *= 100
    exact, got = linear(x), int8(x)
    assert got.shape == exact.shape == (2, 3, 32)
    relative = ((got - exact).norm(dim=-1) / exact.norm(dim=-1)).max()
    assert relative < 0.02, relative
    assert torch.allclose(int8(x[1:]), got[1:], atol=1e-5)  # a row's result does not depend on the batch
    # what the layer computes: per-row int8 activations times int8 weights, rescaled by both scales
    rows = x.reshape(-1, 64)
    row_scale = (rows.abs().amax(1, keepdim=True) / 127).clamp(min=1e-8)
    product = (rows / row_scale).round() @ int8.weight_t.float()
    reference = product * row_scale * int8.weight_scale + linear.bias.detach()
    torch.testing.assert_close(got.reshape(-1, 32), reference, rtol=1e-5, atol=1e-5)


def test_int8_kernels_sum_the_same_integers():
    """Each kernel's product of rows scaled into +-127 and 7-bit weights is the exact integer product (FBGEMM
    may round an activation within ~1e-5 of a half step the other way: none here)."""
    generator = torch.Generator().manual_seed(1)
    scaled = int8_kernels.scale_rows(torch.randn(40, 96, generator=generator))[0]
    weight_t = torch.randint(-63, 64, (96, 24), dtype=torch.int8, generator=generator)
    exact = scaled.round() @ weight_t.float()
    for name in int8_kernels.available():
        kernel = int8_kernels.make(weight_t, name)
        assert kernel.name == name
        torch.testing.assert_close(kernel(kernel.prepare(scaled.clone())), exact, rtol=0, atol=0)


def test_int8_kernel_leaves_onednn_only_for_a_far_faster_one(caplog):
    """The probe finds a slow path (the AVX2-only EPYC's timings: oneDNN's a reference loop) but does not rank two
    fast kernels, so a kernel within SWITCH_FACTOR of oneDNN's does not replace it."""
    epyc = {"fp32": 0.0042, "onednn": 0.1818, "fbgemm": 0.0027}
    with caplog.at_level(logging.INFO, logger="sempa_train.stages.int8_kernels"):
        assert int8_kernels.choose(epyc) == "fbgemm"
        assert "int8 kernel: fbgemm (onednn's is 67x slower" in caplog.text and "onednn 181.8 ms" in caplog.text
        assert int8_kernels.choose({"fp32": 0.0047, "onednn": 0.0031, "fbgemm": 0.0029}) == "onednn"
        assert int8_kernels.choose({"fp32": 0.0055, "onednn": 0.0019, "fbgemm": 0.0028}) == "onednn"
        assert int8_kernels.choose({"fp32": 0.0055, "fbgemm": 0.0028}) == "fbgemm"  # a torch without oneDNN's
    assert "no other is 2x faster here" in caplog.text
    assert not any(record.levelname == "WARNING" for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sempa_train.stages.int8_kernels"):
        assert int8_kernels.choose({"fp32": 0.001, "onednn": 0.003}) == "onednn"
    assert "no faster than fp32" in caplog.text


def test_int8_kernel_measured_once_or_named(monkeypatch):
    times = int8_kernels.measure(shape=(8, 32, 16), repeats=2)
    assert set(times) == {"fp32", *int8_kernels.available()} and all(t > 0 for t in times.values())
    ticks = iter(range(100))
    slow = int8_kernels._seconds(lambda: None, repeats=5, timer=lambda: next(ticks) * 0.2)  # 0.2 s a call
    assert slow == pytest.approx(0.2) and next(ticks) == 4  # a slow kernel is timed once after its warm-up
    monkeypatch.setattr(int8_kernels, "measure", lambda: pytest.fail("measured though named"))
    int8_kernels.chosen.cache_clear()
    int8_kernels.probe_times.cache_clear()
    monkeypatch.setenv(int8_kernels.ENV, "onednn")
    try:
        assert int8_kernels.chosen() == "onednn"
        int8_kernels.chosen.cache_clear()
        monkeypatch.setenv(int8_kernels.ENV, "cublas")
        with pytest.raises(ValueError, match="SEMPA_INT8_KERNEL='cublas'"):
            int8_kernels.chosen()
    finally:
        int8_kernels.chosen.cache_clear()
        int8_kernels.probe_times.cache_clear()


def test_layers_reading_one_input_quantise_it_once(monkeypatch):
    """q/k/v (and gate/up) share a quantiser: one input is quantised once, with the same result as apart."""
    from sempa_train.stages import quantize

    torch.manual_seed(0)
    linears = [torch.nn.Linear(64, n) for n in (32, 16, 16)]
    shared = quantize.SharedInput()
    together = [quantize.Int8Linear(linear, shared=shared) for linear in linears]
    x, y = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    expected = [quantize.Int8Linear(linear)(x) for linear in linears]
    calls, original = [], quantize.scale_rows
    monkeypatch.setattr(quantize, "scale_rows", lambda x: calls.append(x.shape) or original(x))
    outputs = [layer(x) for layer in together]
    assert len(calls) == 1
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    together[0](y), together[1](y)  # a new input is quantised again, once
    assert len(calls) == 2
    del y
    assert shared._rows is None  # nothing is kept once the input is gone
    other = "fbgemm" if shared.kernel == "onednn" else "onednn"
    with pytest.raises(ValueError, match="shared quantiser"):
        quantize.Int8Linear(linears[0], shared=shared, kernel=other)


def test_int8_weight_levels_follow_the_kernel_and_the_cpu(monkeypatch):
    """Full-range weights only where the kernel multiplies int8 into int32: FBGEMM has AVX512-VNNI kernels but none
    for AVX-VNNI or AMX, and its own cap can keep it off VNNI."""
    monkeypatch.delenv("FBGEMM_ENABLE_INSTRUCTIONS", raising=False)
    for flags, dot, onednn, fbgemm in [({"avx2"}, False, 63, 63), ({"avx2", "avx_vnni"}, True, 127, 63),
                                       ({"avx512f", "avx512_vnni"}, True, 127, 127)]:
        monkeypatch.setattr(int8_kernels, "cpu_flags", lambda flags=flags: frozenset(flags))
        monkeypatch.setattr(int8_kernels, "cpu_has_int8_dot", lambda dot=dot: dot)
        assert (int8_kernels.weight_levels("onednn"), int8_kernels.weight_levels("fbgemm")) == (onednn, fbgemm)
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX512")  # AVX-512 without VNNI: int16 pairs again
    assert int8_kernels.weight_levels("fbgemm") == 63


def test_int8_weights_are_7_bit_without_int8_dot_products_and_exact_there(monkeypatch, tiny_model_dir):
    """Without VNNI/AMX, int8 kernels may sum pairs of int8 products in int16: full-range weights overflow it,
    7-bit ones do not. Checked for every kernel in a child process with torch, oneDNN and FBGEMM capped to AVX2
    (the caps are read at start-up)."""
    import subprocess
    import sys

    monkeypatch.setattr(int8_kernels, "cpu_has_int8_dot", lambda: False)
    monkeypatch.setattr(int8_kernels, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    int8 = load_encoder(tiny_model_dir, EmbedConfig(quantize="int8"), show_progress=False)
    weights = int8.model.model.layers[0].mlp.gate_proj.weight_t
    assert weights.abs().max() == 63
    code = ("import torch; from sempa_train.stages import int8_kernels\n"
            "torch.manual_seed(0); a = torch.randint(-127, 128, (16, 512)).float()\n"
            "for name in int8_kernels.available():\n"
            "    for levels in (127, 63):\n"
            "        b = torch.randint(-levels, levels + 1, (512, 64), dtype=torch.int8)\n"
            "        kernel = int8_kernels.make(b, name)\n"
            "        print(name, levels, int((kernel(kernel.prepare(a.clone())) - a @ b.float()).abs().max()))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
           "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
    lines = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    errors = {(name, int(levels)): int(error) for name, levels, error in (line.split() for line in lines)}
    assert {name for name, _ in errors} == set(int8_kernels.available())
    assert all(error == 0 for (_, levels), error in errors.items() if levels == 63)  # 7-bit weights: exact
    # Full-range weights overflow FBGEMM's AVX2 kernel on every CPU (its cap forces that kernel); oneDNN's overflows
    # under its cap on Zen 4 and Sapphire Rapids, but on an AVX2-only EPYC its int8 product is an exact reference loop.
    if "fbgemm" in int8_kernels.available():
        assert errors["fbgemm", 127] > 0
    assert max(error for (_, levels), error in errors.items() if levels == 127) > 0


def test_common_prefix_leaves_every_last_token():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == [1, 2]
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == [1, 2]
    assert common_prefix([[7], [7, 8]]) == []
    assert common_prefix([[1, 2], [3, 4]]) == [] and common_prefix([]) == []


def test_layer_option_reads_an_earlier_layer(tiny):
    model, tokenizer = tiny
    last = PromptEOLEncoder(model, tokenizer, show_progress=False).encode(SENTENCES[:2])
    first = PromptEOLEncoder(model, tokenizer, layer=1, show_progress=False).encode(SENTENCES[:2])
    assert not np.allclose(last, first)
    ids = tokenizer(PromptEOLEncoder(model, tokenizer).prompts(SENTENCES[:1]), return_tensors="pt")
    with torch.no_grad():
        layer1 = model(**ids, output_hidden_states=True).hidden_states[1][0, -1].numpy()
    np.testing.assert_allclose(first[0], layer1, rtol=1e-4, atol=1e-4)


def test_empty_input_and_auto_kind(tiny_model_dir):
    encoder = load_encoder(tiny_model_dir, EmbedConfig(dtype="float32"), show_progress=False)
    assert isinstance(encoder, PromptEOLEncoder)
    assert encoder.encode([]).shape == (0, 128)


def test_sentence_transformers_folder_is_detected():
    encoder = load_encoder("all-minilm-l6-v2", show_progress=False)
    vectors = encoder.encode(["A man plays a guitar.", "A man is playing the guitar.", "Stocks fell sharply."])
    assert vectors.shape == (3, 384)
    sims = cosine(vectors[[0, 0]], vectors[[1, 2]])
    assert sims[0] > 0.8 > sims[1]
    with pytest.raises(ValueError, match="LoRA adapter applies to PromptEOL"):
        load_encoder("all-minilm-l6-v2", adapter="x")
