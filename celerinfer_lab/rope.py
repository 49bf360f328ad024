"""The RoPE cos/sin cache, computed as MiniMind's ``precompute_freqs_cis`` computes it.

The cache is stored in the model file, [max_position_embeddings, head_dim] each, with the two
halves concatenated (column i and i + head_dim/2 hold frequency i). Both forwards read it from
the file; the pairing (half-split or interleaved) only decides which dimensions a frequency
rotates. The arithmetic is MiniMind's, in torch float32, so a file made here carries the same
bits a MiniMind model would compute.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

from .config import ModelConfig


def rope_cache(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), float32 [max_position_embeddings, head_dim]; YaRN applied when configured, by the
    rule its rope_scaling names (config.YARN_RULES)."""
    import torch  # here, not at the top: importing the package (or `generate --help`) must not load torch

    dim, end, base = config.head_dim, config.max_position_embeddings, config.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    attn_factor = 1.0
    scaling = config.rope_scaling if config.inference_rope_scaling else None
    if scaling is not None:
        attn_factor = scaling.get("attention_factor", 1.0)
        if scaling.get("rule", "minimind") == "transformers":
            freqs = transformers_yarn_freqs(dim, base, scaling)
        else:
            freqs = minimind_yarn_freqs(freqs, dim, end, base, scaling)
    angles = torch.outer(torch.arange(end), freqs).float().numpy()
    # Trig in numpy float32: torch's vectorized cos/sin round differently (1 ulp) on some CPUs,
    # numpy's reproduce the original CelerInfer cache bit for bit.
    cos, sin = np.cos(angles), np.sin(angles)
    cos = np.concatenate([cos, cos], axis=-1) * np.float32(attn_factor)
    sin = np.concatenate([sin, sin], axis=-1) * np.float32(attn_factor)
    return cos.astype(np.float32), sin.astype(np.float32)


def minimind_yarn_freqs(freqs: torch.Tensor, dim: int, end: int, base: float, scaling: dict) -> torch.Tensor:
    """MiniMind's YaRN (model_minimind.py ``precompute_freqs_cis``): ``freqs`` scaled only when the
    cache reaches past original_max_position_embeddings, the ramp's bounds truncated and the high one
    clamped to dim//2 - 1."""
    import torch

    orig_max = scaling.get("original_max_position_embeddings", 2048)
    factor = scaling.get("factor", 16)
    beta_fast = scaling.get("beta_fast", 32.0)
    beta_slow = scaling.get("beta_slow", 1.0)
    if end / orig_max <= 1.0:
        return freqs

    def inv_dim(b: float) -> float:
        return (dim * math.log(orig_max / (b * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(inv_dim(beta_fast)), 0)
    high = min(math.ceil(inv_dim(beta_slow)), dim // 2 - 1)
    ramp = torch.clamp((torch.arange(dim // 2).float() - low) / max(high - low, 0.001), 0, 1)
    return freqs * (1 - ramp + ramp / factor)


def transformers_yarn_freqs(dim: int, base: float, scaling: dict) -> torch.Tensor:
    """transformers' YaRN (modeling_rope_utils.py ``_compute_yarn_parameters``, 5.24), always applied:
    interpolated and extrapolated frequencies blended by a ramp whose bounds are floored/ceiled only
    with ``truncate`` and clamped to [0, dim - 1]; the float32 arithmetic in transformers' order."""
    import torch

    factor = scaling["factor"]
    orig_max = scaling["original_max_position_embeddings"]
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp.float()
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
