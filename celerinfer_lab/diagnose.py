"""Say what kind of bug the culprit op has, when the numbers show a clear pattern.

Works on the culprit's isolated value y (the C++ op run on the oracle's inputs) against the
oracle's x, so upstream noise does not blur the pattern. Checks, first match wins:

1. never written (still NaN-filled), NaN/Inf, all zeros;
2. masks: -inf missing above the diagonal (causal), padded keys not masked;
3. known mistakes, recomputed from the oracle's inputs for the culprit's op: RMSNorm eps outside
   the square root or weight ignored, the other RoPE pairing, GQA's j % kv_heads mapping, scores
   divided by head_dim, softmax over the wrong axis, GELU for SiLU, gate and up swapped, the
   embedding read as an untied head, top-k weights not renormalised;
4. y equals another reference trace point (swapped operands, wrong buffer, a skipped op);
5. sign flip (cosine ~ -1), a uniform scale (cosine ~ 1, norm ratio != 1), a per-channel scale;
6. a permutation: heads swapped, or the pairs inside each head laid out the other way;
7. a shift by one position; an error only from position t on; an error only at padded keys.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .compare import MASKED_BELOW, Report, live_rows
from .reference import apply_rope, repeat_kv, rms_norm
from .trace import trace_points


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| over elements finite in both (masked scores excluded)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b) & (b > MASKED_BELOW) & (a > MASKED_BELOW)
    nb = np.linalg.norm(b[ok])
    return float(np.linalg.norm(a[ok] - b[ok]) / nb) if nb > 0 else math.inf


class _Context:
    def __init__(self, report: Report):
        self.report, self.culprit = report, report.culprit
        self.model, self.config = report.meta.get("model"), report.meta.get("config")
        self.oracle = report.runs["oracle"]
        self.name = self.culprit.name
        self.x = self.oracle[self.name].astype(np.float64)
        self.y = report.runs["cpp_own"][self.name].astype(np.float64)
        self.mask = report.attention_mask  # the query rows compared [B, S]
        self.key_mask = report.meta.get("key_mask", self.mask)  # every key [B, past + S]
        B, S = self.mask.shape
        self.point = next(p for p in trace_points(self.config, B, S, report.meta.get("past_len", 0)) if p.name == self.name)
        self.base_error = _rel(self.y, self.x)
        parts = self.name.split(".")
        self.layer = int(parts[2]) if self.name.startswith("model.layers.") else None
        self.op = ".".join(parts[3:]) if self.layer is not None else self.name

    def live(self, array: np.ndarray) -> np.ndarray:
        return live_rows(array, self.point.token_axis, self.mask)

    def matches(self, candidate) -> bool:
        """y is candidate (to float32 noise), and much closer to it than to the reference."""
        cand = np.asarray(candidate, np.float64).reshape(self.y.shape)
        err = _rel(self.live(self.y), self.live(cand))
        return err < 1e-4 and err < 0.01 * self.base_error

    def t(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.oracle[name], dtype=np.float64))

    def weight(self, key: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.model.state_dict()[key], dtype=np.float64))

    def prefix(self, suffix: str) -> str:
        return f"model.layers.{self.layer}.{suffix}"


# ---- 1, 2: broken values and masks -------------------------------------------------------------
def _broken_values(c: _Context) -> str | None:
    y, x = c.live(c.y), c.live(c.x)
    if np.isnan(y).all():
        return "never written: every value is still the NaN the output buffer was filled with"
    bad = (np.isnan(y) | np.isinf(y)) & np.isfinite(x)
    if bad.any():
        return f"NaN/Inf: {int(bad.sum())} of {bad.size} values are not finite where the reference is"
    if (y == 0).all() and (x != 0).any():
        return "all zeros: the op produced zeros (an unwritten or cleared buffer?)"
    return None


def _masks(c: _Context) -> str | None:
    if c.op != "self_attn.scores":
        return None
    y, x = c.live(c.y), c.live(c.x)
    if (np.isneginf(x) & (y > MASKED_BELOW)).any():
        return "causal mask missing: scores above the diagonal are not -inf (tokens see the future)"
    padded = np.isfinite(x) & (x <= MASKED_BELOW)
    if (padded & (y > MASKED_BELOW)).any():
        return "padding mask ignored: scores of padded keys are not masked (-1e9 not added)"
    return None


# ---- 3: known mistakes, recomputed from the oracle's inputs ------------------------------------
def _norm_variants(c: _Context) -> str | None:
    sources = {"input_layernorm": None, "post_attention_layernorm": "attn_residual",
               "self_attn.q_norm": "self_attn.q_proj", "self_attn.k_norm": "self_attn.k_proj"}
    if c.op == "model.norm":
        src, key = f"model.layers.{c.config.num_hidden_layers - 1}", "model.norm.weight"
    elif c.op in sources:
        if c.op == "input_layernorm":
            src = "model.embed_tokens" if c.layer == 0 else f"model.layers.{c.layer - 1}"
        else:
            src = c.prefix(sources[c.op])
        key = c.prefix(c.op + ".weight")
    else:
        return None
    x = c.t(src).reshape(c.y.shape)
    w, eps = c.weight(key), c.config.rms_norm_eps
    if c.matches(w * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps)):
        return "RMSNorm eps outside the square root: y = w * x / (sqrt(mean(x^2)) + eps)"
    if c.matches(rms_norm(x, torch.ones_like(w), eps)):
        return "RMSNorm weight ignored (norm weight ignored): y = x / rms(x), never multiplied by w"
    return None


def _rope_variant(c: _Context) -> str | None:
    if c.op not in ("self_attn.rope_q", "self_attn.rope_k"):
        return None
    which = c.op[-1]
    src = c.prefix(f"self_attn.{which}_norm") if c.config.qk_norm else c.prefix(f"self_attn.{which}_proj")
    x = c.t(src).reshape(c.y.shape)
    start = c.report.meta.get("past_len", 0)  # decode steps rotate by their own positions
    S = x.shape[1]
    cos = torch.from_numpy(c.model.rope_cos[start:start + S].astype(np.float64))
    sin = torch.from_numpy(c.model.rope_sin[start:start + S].astype(np.float64))
    other = "interleaved" if c.config.rope_pairing == "half" else "half"
    if c.matches(apply_rope(x, cos, sin, other)):
        return (f"RoPE pairing swapped: matches {other} pairs, the model uses {c.config.rope_pairing} "
                f"(interleaved (2i, 2i+1) vs half-split (i, i + head_dim/2))")
    return None


def _scores(c: _Context, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    S = q.shape[1]
    scores = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-2, -1)) / scale
    scores = scores + torch.full((S, S), float("-inf"), dtype=scores.dtype).triu(1)
    return scores + (1.0 - torch.from_numpy(c.key_mask)[:, None, None, :].double()) * -1e9


def _scores_variants(c: _Context) -> str | None:
    if c.op != "self_attn.scores" or c.report.meta.get("past_len"):  # decode: the cached keys are not in the trace
        return None
    cfg = c.config
    q, k = c.t(c.prefix("self_attn.rope_q")), c.t(c.prefix("self_attn.rope_k"))
    hd = cfg.head_dim
    modulo = k[:, :, [j % cfg.num_key_value_heads for j in range(cfg.num_attention_heads)]]
    if cfg.n_rep > 1 and c.matches(_scores(c, q, modulo, math.sqrt(hd))):
        return "GQA mapping wrong: query head j reads kv head j % kv_heads instead of j // (heads / kv_heads)"
    if c.matches(_scores(c, q, repeat_kv(k, cfg.n_rep), float(hd))):
        return "scale error: scores divided by head_dim instead of sqrt(head_dim)"
    return None


def _probs_variant(c: _Context) -> str | None:
    if c.op != "self_attn.probs":
        return None
    scores = c.t(c.prefix("self_attn.scores"))
    if c.matches(F.softmax(scores, dim=-2)):
        return "softmax over the wrong axis: each column (key) sums to 1 instead of each row (query)"
    return None


def _act_variants(c: _Context) -> str | None:
    if c.op != "mlp.act":
        return None
    gate, up = c.t(c.prefix("mlp.gate_proj")), c.t(c.prefix("mlp.up_proj"))
    if c.matches(F.gelu(gate) * up) or c.matches(F.gelu(gate, approximate="tanh") * up):
        return "GELU where SiLU belongs: y = gelu(gate) * up"
    if c.matches(F.silu(up) * gate):
        return "gate and up swapped: y = silu(up) * gate"
    return None


def _head_variant(c: _Context) -> str | None:
    if c.op != "lm_head" or c.config.tie_word_embeddings:
        return None
    if c.matches(F.linear(c.t("model.norm"), c.weight("model.embed_tokens.weight"))):
        return "untied lm_head read as the embedding: logits = norm(h) @ embed_tokens^T"
    return None


def _topk_variant(c: _Context) -> str | None:
    if c.op != "mlp.topk_weight":
        return None
    probs, idx = c.t(c.prefix("mlp.router_probs")), c.t(c.prefix("mlp.topk_idx")).long()
    raw = torch.gather(probs, -1, idx)
    if c.config.uses_topk_renorm and c.matches(raw):
        return f"top-k weights not renormalised (topk_renorm={c.config.topk_renorm!r} requires it)"
    if not c.config.uses_topk_renorm and c.matches(raw / raw.sum(-1, keepdim=True)):
        return f"top-k weights renormalised although topk_renorm={c.config.topk_renorm!r} forbids it"
    return None


# ---- 4: another point's value ------------------------------------------------------------------
def _equals_other_point(c: _Context) -> str | None:
    for name, value in c.oracle.items():
        if name == c.name or value.size != c.y.size or value.dtype.kind != "f":
            continue
        if c.matches(value.reshape(c.y.shape)):
            return f"equals the reference's {name}: swapped operands, the wrong buffer, or a skipped op"
    return None


# ---- 5: sign and scale -----------------------------------------------------------------------
def _sign_and_scale(c: _Context) -> str | None:
    y, x = c.live(c.y), c.live(c.x)
    ok = np.isfinite(x) & np.isfinite(y) & (x > MASKED_BELOW)
    xs, ys = x[ok], y[ok]
    nx, ny = np.linalg.norm(xs), np.linalg.norm(ys)
    if nx == 0 or ny == 0:
        return None
    cosine = float(xs @ ys / (nx * ny))
    if cosine < -0.999:
        return f"sign flip: cosine {cosine:.4f} (y = -x{f' * {ny / nx:.4g}' if abs(ny / nx - 1) > 1e-3 else ''})"
    ratio = ny / nx
    if cosine > 0.99999:
        hint = ""
        hd = c.config.head_dim
        for label, value in ((f"1/sqrt(head_dim={hd})", 1 / math.sqrt(hd)), (f"sqrt(head_dim={hd})", math.sqrt(hd)),
                             ("2", 2.0), ("1/2", 0.5)):
            if abs(ratio / value - 1) < 1e-3:
                hint = f" ~ {label}"
        return f"scale error: cosine {cosine:.6f} but ||y|| / ||x|| = {ratio:.6g}{hint}"
    # A per-channel scale: y / x constant down each column (last axis), different across columns.
    if x.ndim == 2 and x.shape[0] > 1:
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(np.abs(x) > 1e-6, y / x, np.nan)
        col_mean = np.nanmean(r, axis=0)
        spread = np.nanmax(np.abs(r - col_mean), axis=0)
        if np.isfinite(spread).all() and (spread < 1e-3 * np.abs(col_mean)).all() and np.ptp(col_mean) > 1e-3:
            return ("per-channel scale: y / x is constant down each channel but differs between channels "
                    "(a weight applied twice, ignored, or the wrong one)")
    return None


# ---- 6: permutations ---------------------------------------------------------------------------
def _head_axis_view(c: _Context, array: np.ndarray) -> np.ndarray | None:
    """[tokens, heads, hd] or [B, heads, rest] views for head-structured points, else None."""
    cfg = c.config
    if c.point.token_axis == 2:  # attention [B, nh, S, S]
        return array.reshape(array.shape[0], array.shape[1], -1)
    n = {cfg.q_dim: cfg.num_attention_heads, cfg.kv_dim: cfg.num_key_value_heads}.get(
        int(np.prod(array.shape[2:])))
    if n is None or n < 2 or c.op.startswith("mlp") or c.op in ("o_proj", "attn_residual"):
        return None
    return array.reshape(array.shape[0] * array.shape[1], n, -1)


def _permutation(c: _Context) -> str | None:
    xv, yv = _head_axis_view(c, c.x), _head_axis_view(c, c.y)
    if xv is not None and c.point.token_axis == 1:
        real = c.mask.reshape(-1).astype(bool)
        xv, yv = xv[real], yv[real]
    if xv is not None:
        n = xv.shape[1]
        best = [min(range(n), key=lambda j, i=i: _rel(yv[:, i], xv[:, j])) for i in range(n)]
        if best != list(range(n)) and sorted(best) == list(range(n)) and \
                all(_rel(yv[:, i], xv[:, best[i]]) < 1e-4 for i in range(n)):
            return f"heads permuted: C++ head i holds reference head {best} [i]"
    hd = c.config.head_dim
    if c.x.shape[-1] == hd or (xv is not None and xv.shape[-1] == hd):
        to_interleaved = np.stack([np.arange(hd // 2), np.arange(hd // 2) + hd // 2], axis=-1).reshape(-1)
        for label, perm in (("interleaved", to_interleaved), ("half-split", np.argsort(to_interleaved))):
            if c.matches(c.x.reshape(-1, hd)[:, perm]):
                return f"pairs inside each head permuted: y is the reference laid out {label}"
    return None


# ---- 7: positions ------------------------------------------------------------------------------
def _positions(c: _Context) -> str | None:
    axis = c.point.token_axis
    x, y = np.moveaxis(c.x, axis, 1), np.moveaxis(c.y, axis, 1)
    S = x.shape[1]
    if S > 1:
        for shift, label in ((1, "later"), (-1, "earlier")):
            src = slice(0, S - 1) if shift == 1 else slice(1, S)
            dst = slice(1, S) if shift == 1 else slice(0, S - 1)
            if _rel(y[:, dst], x[:, src]) < 1e-4:
                return f"shifted by one position: y at position t holds the reference at t {'-' if shift == 1 else '+'} 1 ({label})"
    if c.point.token_axis == 2:  # attention: errors confined to padded keys?
        found = _padded_keys_only(c)
        if found:
            return found
    real = c.mask.astype(bool)
    per_pos = np.array([_rel(y[:, t][real[:, t]], x[:, t][real[:, t]]) if real[:, t].any() else 0.0 for t in range(S)])
    bad = per_pos > max(1e-5, 0.1 * np.nanmax(per_pos))
    if bad.any() and not bad.all():
        first = int(np.argmax(bad))
        if bad[first:].all() and first > 0:
            return f"error only from position {first} on (earlier positions agree): a causality or position bug"
    return None


def _padded_keys_only(c: _Context) -> str | None:
    """[B, nh, S, S] values: large errors at padded key columns, none at real ones (real queries only)."""
    x, y = c.x, c.y
    live = np.isfinite(x) & (x > MASKED_BELOW)
    with np.errstate(invalid="ignore"):
        err = np.where(live, np.abs(np.nan_to_num(y, nan=np.inf) - x), 0.0)
    query_real = c.mask.astype(bool)[:, None, :, None]
    key_padded = ~c.key_mask.astype(bool)[:, None, None, :]
    scale = float(np.abs(x[live]).max(initial=0.0)) or 1.0
    pad_err = float(np.max(err, where=query_real & key_padded, initial=0.0))
    real_err = float(np.max(err, where=query_real & ~key_padded, initial=0.0))
    if pad_err > 1e-4 * scale and real_err < 1e-5 * scale:
        return "error only at padded key positions: the padding mask is not applied as MiniMind does"
    return None


CHECKS = (_broken_values, _masks, _norm_variants, _rope_variant, _scores_variants, _probs_variant, _act_variants,
          _head_variant, _topk_variant, _equals_other_point, _sign_and_scale, _permutation, _positions)


def diagnose(report: Report) -> str | None:
    """A sentence naming the culprit's pattern, or None when no check recognises it."""
    if report.culprit is None or report.meta.get("model") is None:
        return None
    c = _Context(report)
    for check in CHECKS:
        found = check(c)
        if found:
            return found
    return None
