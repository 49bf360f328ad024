"""Reduced-precision weight formats: bfloat16 and Q8_0, encoded and decoded bit for bit.

* ``bf16``: the top 16 bits of each float32, rounded to nearest even (what ``torch.bfloat16`` and
  every bf16 converter in hardware do); decoding is exact (a shift).
* ``q8``: llama.cpp's Q8_0, byte for byte: each row of a matrix [out, in] in blocks of 32 weights
  along ``in``, each block a float16 scale ``d`` then 32 int8 ``q`` (34 bytes); the weight is
  ``q * d``. Encoding is ggml's ``quantize_row_q8_0_ref``: ``d = amax / 127`` in float32,
  ``q = roundf(x * (1/d))`` (half away from zero), the stored scale is ``float16(d)``. A row whose
  length is not a multiple of 32 ends in a block padded with zero weights (llama.cpp needs a
  multiple of 32; export to GGUF refuses the padded case).

Decoding ``q8`` into float64 is exact (an int8 times a float16 fits in a double), which is what the
precision-matched oracle runs on; into float32 it rounds once per weight.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError

WEIGHT_FORMATS = ("f32", "bf16", "q8")
Q8_BLOCK = 32  # weights per block along the input dimension
Q8_BLOCK_BYTES = 2 + Q8_BLOCK  # float16 scale + 32 int8
_Q8_BLOCK_DTYPE = np.dtype([("d", "<f2"), ("qs", "i1", (Q8_BLOCK,))])
_F16_MAX = float(np.finfo(np.float16).max)


def check_weight_format(fmt: str) -> str:
    if fmt not in WEIGHT_FORMATS:
        raise ConfigError(f"weight format {fmt!r}: must be one of {', '.join(WEIGHT_FORMATS)}")
    return fmt


def q8_blocks(in_features: int) -> int:
    """Blocks per row: ceil(in / 32)."""
    return -(-in_features // Q8_BLOCK)


def q8_row_bytes(in_features: int) -> int:
    return q8_blocks(in_features) * Q8_BLOCK_BYTES


# ---- bfloat16 --------------------------------------------------------------------------------
def to_bf16(w: np.ndarray, name: str = "weight") -> np.ndarray:
    """float32 -> bfloat16 bits (uint16, same shape), round to nearest even."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    rounded = (bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    finite_in = np.isfinite(w)
    overflow = finite_in & ((out & 0x7F80) == 0x7F80)
    if overflow.any():
        raise ConfigError(f"{name}: values beyond bfloat16's range (largest finite is about 3.39e38)")
    nan = ~finite_in & np.isnan(w)
    if nan.any():  # keep a NaN a NaN (rounding could carry it into infinity)
        out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return out


def from_bf16(b: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """bfloat16 bits -> float32 (exact), or float64 (also exact)."""
    f = (np.ascontiguousarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return f.astype(dtype, copy=False)


# ---- Q8_0 -------------------------------------------------------------------------------------
def to_q8(w: np.ndarray, name: str = "weight") -> np.ndarray:
    """float32 [out, in] -> Q8_0 bytes, uint8 [out, ceil(in/32) * 34]."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ConfigError(f"{name}: Q8_0 stores matrices, got shape {list(w.shape)}")
    out_f, in_f = w.shape
    nb = q8_blocks(in_f)
    padded = np.zeros((out_f, nb * Q8_BLOCK), np.float32)
    padded[:, :in_f] = w
    x = padded.reshape(out_f, nb, Q8_BLOCK)
    if not np.isfinite(x).all():
        raise ConfigError(f"{name}: Q8_0 cannot hold NaN or infinity")
    amax = np.abs(x).max(axis=-1)
    d = (amax / np.float32(127)).astype(np.float32)  # float32 division, as ggml
    if (d > _F16_MAX).any():
        raise ConfigError(f"{name}: a block's scale {float(d.max()):.3g} is beyond float16's range")
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    scaled = (x * inv[..., None]).astype(np.float32).astype(np.float64)  # float32 product, as ggml
    q = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)  # roundf: half away from zero, exact in float64
    blocks = np.empty((out_f, nb), _Q8_BLOCK_DTYPE)
    blocks["d"] = d.astype(np.float16)
    blocks["qs"] = q.astype(np.int8)
    return blocks.view(np.uint8).reshape(out_f, nb * Q8_BLOCK_BYTES)


def q8_parts(data: np.ndarray, in_features: int) -> tuple[np.ndarray, np.ndarray]:
    """(scales float16 [out, nb], values int8 [out, nb * 32]) of Q8_0 bytes uint8 [out, nb * 34]."""
    nb = q8_blocks(in_features)
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != nb * Q8_BLOCK_BYTES:
        raise ConfigError(
            f"Q8_0 data of shape {list(data.shape)} does not hold rows of {in_features} weights "
            f"({nb} blocks of {Q8_BLOCK_BYTES} bytes)"
        )
    blocks = data.view(_Q8_BLOCK_DTYPE).reshape(data.shape[0], nb)
    return blocks["d"].copy(), blocks["qs"].reshape(data.shape[0], nb * Q8_BLOCK).copy()


def from_q8(data: np.ndarray, in_features: int, dtype: type = np.float32) -> np.ndarray:
    """Q8_0 bytes -> [out, in]: exact in float64; in float32 each weight rounds once."""
    scales, values = q8_parts(data, in_features)
    nb = scales.shape[1]
    w = values.reshape(-1, nb, Q8_BLOCK).astype(np.float64) * scales.astype(np.float64)[..., None]
    return w.reshape(-1, nb * Q8_BLOCK)[:, :in_features].astype(dtype)


# ---- one entry point per direction ------------------------------------------------------------
def encode(w: np.ndarray, fmt: str, name: str = "weight") -> np.ndarray:
    """The stored form of a float32 weight in ``fmt`` (f32: itself)."""
    check_weight_format(fmt)
    if fmt == "bf16":
        return to_bf16(w, name)
    if fmt == "q8":
        return to_q8(w, name)
    return np.ascontiguousarray(w, dtype=np.float32)


def decode(stored: np.ndarray, fmt: str, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """The weight values (``shape``, the logical shape) of a stored form, in ``dtype``."""
    check_weight_format(fmt)
    if fmt == "bf16":
        return from_bf16(stored, dtype).reshape(shape)
    if fmt == "q8":
        return from_q8(stored, shape[-1], dtype).reshape(shape)
    return np.asarray(stored).astype(dtype, copy=False).reshape(shape)


_FORMAT_LABELS = {"f32": "float32", "bf16": "bf16 (bfloat16)", "q8": "q8 (Q8_0)"}


def weights_label(fmt: str) -> str:
    """What a comparison ran on, for its summary: the weights and the oracle the kernels were judged by."""
    check_weight_format(fmt)
    if fmt == "f32":
        return "weights: float32, oracle: float64 on them"
    return f"weights: {_FORMAT_LABELS[fmt]}, oracle: float64 on the decoded {fmt} weights"
