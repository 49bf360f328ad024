"""The weight codecs (celerinfer_lab/quantize.py) against independent encoders: torch's bfloat16
and the `gguf` package's Q8_0 and BF16 (llama.cpp's Python reference), bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from celerinfer_lab import quantize as q
from celerinfer_lab.errors import ConfigError
from celerinfer_lab.schema import reduced_weights

Q8_0 = gguf.GGMLQuantizationType.Q8_0
BF16 = gguf.GGMLQuantizationType.BF16


def awkward_matrix(rows: int = 40, cols: int = 96, seed: int = 0) -> np.ndarray:
    """Rows of very different scales, an all-zero block, exact rounding ties and subnormal-scale blocks."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * rng.uniform(1e-4, 5, (rows, 1))).astype(np.float32)
    w[0, :32] = 0.0  # d = 0: every q is 0
    w[1, :32] = np.float32(0.5) * np.arange(32, dtype=np.float32) - 8  # x / d lands on .5 ties
    w[1, 31] = 127.0  # amax 127 -> d = 1 exactly, so 2.5 -> 3 and -7.5 -> -8 (half away from zero)
    w[2, :32] *= np.float32(1e-9)  # a scale below float16's normal range
    return w


def test_q8_matches_llama_cpp_reference_bit_for_bit() -> None:
    w = awkward_matrix()
    ours = q.to_q8(w)
    assert np.array_equal(ours, gguf.quants.quantize(w, Q8_0))
    assert np.array_equal(q.from_q8(ours, w.shape[1]), gguf.quants.dequantize(ours, Q8_0))


def test_q8_rounds_ties_away_from_zero() -> None:
    scales, values = q.q8_parts(q.to_q8(awkward_matrix()), 96)
    assert scales[1, 0] == 1.0
    assert values[1, 21] == 3 and values[1, 1] == -8  # 2.5 and -7.5; numpy's round would give 2 and -8
    assert not values[0, :32].any() and scales[0, 0] == 0


def test_q8_float64_decoding_is_exact_and_float32_rounds_once() -> None:
    w = awkward_matrix()
    stored = q.to_q8(w)
    scales, values = q.q8_parts(stored, 96)
    exact = values.astype(np.float64).reshape(40, 3, 32) * scales.astype(np.float64)[..., None]
    assert np.array_equal(q.from_q8(stored, 96, np.float64), exact.reshape(40, 96))
    assert np.array_equal(q.from_q8(stored, 96, np.float32), exact.reshape(40, 96).astype(np.float32))


def test_q8_tail_block_is_zero_padded() -> None:
    w = awkward_matrix(cols=70)  # 2 full blocks and a 6-weight tail
    stored = q.to_q8(w)
    assert stored.shape == (40, 3 * q.Q8_BLOCK_BYTES)
    _, values = q.q8_parts(stored, 70)
    assert not values[:, 70:].any()
    # the first 64 columns quantize exactly as llama.cpp would; the tail as a zero-padded block
    padded = np.zeros((40, 96), np.float32)
    padded[:, :70] = w
    assert np.array_equal(stored, gguf.quants.quantize(padded, Q8_0))
    assert q.from_q8(stored, 70).shape == (40, 70)


def test_bf16_matches_torch_and_gguf() -> None:
    w = awkward_matrix()
    w[3, :4] = [
        np.float32(1 + 2**-8),
        np.float32(1 + 3 * 2**-8),
        -np.float32(1 + 2**-8),
        np.float32(1e-40),
    ]  # ties, subnormal
    ours = q.to_bf16(w)
    theirs = torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(ours, gguf.quants.quantize(w, BF16).view(np.uint16))
    assert np.array_equal(q.from_bf16(ours), torch.from_numpy(w).to(torch.bfloat16).float().numpy())


def test_bf16_keeps_nan_and_refuses_overflow() -> None:
    w = np.array([np.nan, 1.0, np.float32(3.4e38)], np.float32)
    with pytest.raises(ConfigError, match="beyond bfloat16's range"):
        q.to_bf16(w, "lm_head.weight")
    assert np.isnan(q.from_bf16(q.to_bf16(w[:2]))[0])


def test_q8_refuses_what_it_cannot_hold() -> None:
    with pytest.raises(ConfigError, match="NaN or infinity"):
        q.to_q8(np.array([[np.inf] * 32], np.float32), "x")
    with pytest.raises(ConfigError, match="float16's range"):
        q.to_q8(np.full((1, 32), 1e7, np.float32), "x")
    with pytest.raises(ConfigError, match="matrices"):
        q.to_q8(np.ones(32, np.float32), "x")
    with pytest.raises(ConfigError, match="does not hold rows of 64"):
        q.q8_parts(np.zeros((2, 34), np.uint8), 64)


def test_encode_decode_round_trip_every_format() -> None:
    w = awkward_matrix()
    for fmt in q.WEIGHT_FORMATS:
        back = q.decode(q.encode(w, fmt), fmt, w.shape)
        assert back.shape == w.shape and back.dtype == np.float32
        if fmt != "q8":  # bf16 and f32 are stable under decode then encode; Q8_0's scale can move
            assert np.array_equal(q.encode(back, fmt), q.encode(w, fmt))
    scales, _ = q.q8_parts(q.encode(w, "q8"), w.shape[1])
    error = np.abs(q.decode(q.encode(w, "q8"), "q8", w.shape) - w).reshape(40, 3, 32)
    step = scales.astype(np.float64)[..., None]
    # half a step, plus 127 times the float16 rounding of the scale (ggml quantizes with the float32 scale)
    assert (error <= 0.5 * step + 127 * (step * 2**-11 + 2**-25)).all()
    with pytest.raises(ConfigError, match="must be one of f32, bf16, q8"):
        q.encode(w, "q4")


# ---- a model in a reduced format (Model.as_format, Model.weight_values) -------------------------
def test_as_format_reduces_the_streamed_matrices_only() -> None:
    from celerinfer_lab import ModelConfig, generate_model

    config = ModelConfig(use_moe=True, num_experts=4, n_shared_experts=1, qk_norm=True, tie_word_embeddings=True)
    model = generate_model(config, seed=3)
    reduced = model.as_format("q8")
    assert reduced.weight_format == "q8" and model.weight_format == "f32" and not model.stored
    assert "model.embed_tokens.weight" in reduced.stored  # tied: it is the head
    assert "model.layers.0.mlp.gate.weight" not in reduced.stored  # the router stays float32
    assert not any("norm" in name for name in reduced.stored)
    assert set(reduced.stored) == {n for n, _ in reduced_weights(config)}
    untied = generate_model(ModelConfig(tie_word_embeddings=False), seed=3).as_format("bf16")
    assert "model.embed_tokens.weight" not in untied.stored and "lm_head.weight" in untied.stored
    for name, stored in reduced.stored.items():
        shape = model.weights[name].shape
        exact = reduced.weight_values(name, np.float64)
        assert np.array_equal(exact, q.from_q8(stored, shape[1], np.float64))
        assert np.array_equal(reduced.weights[name], exact.astype(np.float32))
    assert reduced.as_format("q8") is reduced
    back = reduced.as_format("f32")
    assert not back.stored and back.weights is not reduced.weights
    name = "model.layers.0.self_attn.q_proj.weight"
    assert np.array_equal(back.weights[name], reduced.weights[name])
    assert not np.array_equal(back.weights[name], model.weights[name])  # q8 changed the weights
    with pytest.raises(ConfigError, match="must be one of"):
        model.as_format("int4")
