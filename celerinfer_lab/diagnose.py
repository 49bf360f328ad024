"""Say what kind of bug the culprit op has, when the numbers show a clear pattern.

Works on the culprit's isolated value y (the C++ op run on the oracle's inputs) against the
oracle's x, so upstream noise does not blur the pattern; the other oracle points (and the plain
C++ run, which used the same buffers just before) are the candidates a wrong value may come from.
A decode step (report.meta["past_len"] > 0) traces only its new tokens: the cached keys and
values are not in its trace, so cache checks reason from the scores and probabilities alone.
Checks, first match wins:

1. NaN/Inf that first appear at an op that is finite on the oracle's inputs (a wrong input the
   metrics do not count); never written (still NaN-filled), NaN/Inf, all zeros;
2. masks: the causal mask off by one (the diagonal masked, or the next token seen), -inf missing
   above the diagonal (causal), padded keys not masked;
3. known mistakes, recomputed from the oracle's inputs for the culprit's op: RMSNorm eps outside
   the square root, weight ignored, a sum of squares missing its vector tail, another norm's
   weight; the other RoPE pairing, RoPE rotating the wrong way or at the wrong position; GQA's
   j % kv_heads mapping, scores divided by head_dim, the transposed key cache read with the wrong
   row stride; a decode step's key or value stored in the wrong KV-cache slot; softmax over the
   wrong axis; GELU for SiLU, gate and up swapped; the embedding read as an untied head; top-k
   weights not renormalised; a residual added twice, a shared expert dropped; an attention
   point [B, T, heads, hd] laid out [B, heads, T, hd]; a bf16 KV cache point (k_cached, v_cached)
   rounded another way than to nearest even (truncated, rounded away from zero, ties away, not
   rounded at all);
4. y equals another reference trace point (swapped operands, wrong buffer, a skipped op);
   y - x equals another recorded value (an accumulator not cleared);
5. an error confined to a part, the rest exact: the last n % 16 elements (a vector loop's tail),
   some heads, a block of token rows (a GEMM row tail or row-chunk boundary), a block of output
   columns (a GEMM panel tail);
6. a precision loss (close, beyond tolerance: how many times the float32 floor, and whether it
   grows with the reduction length); sign flip (cosine ~ -1); a uniform scale (cosine ~ 1, a norm
   ratio that differs from 1 by much more than the floor); a per-channel scale;
7. a permutation: heads swapped, or the pairs inside each head laid out the other way;
8. a shift by one position; an error only from position t on; an error only at padded keys.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig
from .kvcache import CACHE_PRE, round_bf16
from .metrics import MASKED_BELOW, live_rows
from .modelfile import Model
from .reference import repeat_kv, rmsnorm, rope
from .report import PointReport, Report
from .trace import trace_points

AGREE = 1e-4  # a part of y agrees with x: relative error below this (float32 noise is ~1e-7)
WRONG = 1e-2  # a part of y is wrong: relative error above this
PRECISION_MAX = 1e3  # a precision loss stays within this many times the float32 floor
# Points whose values are per attention head (a head's slice is the natural unit of a bug there).
HEAD_OPS = (
    "self_attn.q_norm",
    "self_attn.k_norm",
    "self_attn.rope_q",
    "self_attn.rope_k",
    "self_attn.scores",
    "self_attn.probs",
    "self_attn.context",
)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| over elements finite in both (masked scores excluded)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b) & (b > MASKED_BELOW) & (a > MASKED_BELOW)
    nb = np.linalg.norm(b[ok])
    return float(np.linalg.norm(a[ok] - b[ok]) / nb) if nb > 0 else math.inf


def _err(a: np.ndarray, b: np.ndarray) -> float:
    """_rel, but 0 where nothing is comparable or a equals b (a part that is all masked, or all zero, agrees)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b) & (b > MASKED_BELOW) & (a > MASKED_BELOW)
    diff = float(np.linalg.norm(a[ok] - b[ok]))
    nb = float(np.linalg.norm(b[ok]))
    return 0.0 if diff == 0 else (diff / nb if nb > 0 else math.inf)


def _span(indices: Iterable[int]) -> tuple[int, int] | None:
    """(first, last) when the sorted indices are consecutive, else None."""
    idx = [int(i) for i in indices]
    return (idx[0], idx[-1]) if idx and idx[-1] - idx[0] + 1 == len(idx) else None


class _Context:
    """What every check reads: the culprit's isolated value y and the oracle's x, the model and its config."""

    def __init__(self, report: Report, culprit: PointReport, model: Model, config: ModelConfig):
        self.report, self.culprit, self.model, self.config = report, culprit, model, config
        self.oracle = report.runs["oracle"]
        self.name = self.culprit.name
        self.x = self.oracle[self.name].astype(np.float64)
        self.y = report.runs["cpp_own"][self.name].astype(np.float64)
        self.mask = report.attention_mask  # the query rows compared [B, S]
        self.key_mask = report.meta.get("key_mask", self.mask)  # every key [B, past + S]
        self.past = report.meta.get("past_len", 0)  # decode: keys already cached (not in this trace)
        B, S = self.mask.shape
        kv_cache = report.meta.get("kv_cache", "f32")
        self.point = next(p for p in trace_points(self.config, B, S, self.past, kv_cache) if p.name == self.name)
        self.base_error = _rel(self.y, self.x)
        own_floor = self.culprit.own_floor
        min_floor = report.tolerances.at(self.name).min_floor
        self.floor = max(own_floor if math.isfinite(own_floor) else 0.0, min_floor)  # float32's own error here
        parts = self.name.split(".")
        self.layer = int(parts[2]) if self.name.startswith("model.layers.") else None
        self.op = ".".join(parts[3:]) if self.layer is not None else self.name

    def live(self, array: np.ndarray) -> np.ndarray:
        return live_rows(array, self.point.token_axis, self.mask)

    def matches(self, candidate: np.ndarray | torch.Tensor) -> bool:
        """y is candidate (to float32 noise), and much closer to it than to the reference."""
        cand = np.asarray(candidate, np.float64).reshape(self.y.shape)
        err = _rel(self.live(self.y), self.live(cand))
        return err < AGREE and err < 0.01 * self.base_error

    def t(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.oracle[name], dtype=np.float64))

    def weight(self, key: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.model.state_dict()[key], dtype=np.float64))

    def prefix(self, suffix: str) -> str:
        return f"model.layers.{self.layer}.{suffix}"

    def block_input(self) -> str:
        """What the culprit's layer reads: the embedding, or the previous layer's output."""
        if self.layer is None:
            raise ValueError(f"{self.name} is not in a layer")
        return "model.embed_tokens" if self.layer == 0 else f"model.layers.{self.layer - 1}"

    def heads_of(self, size: int) -> int | None:
        """The number of heads a per-token size holds (q_dim: query heads, kv_dim: kv heads)."""
        cfg = self.config
        return {cfg.q_dim: cfg.num_attention_heads, cfg.kv_dim: cfg.num_key_value_heads}.get(size)


# ---- 1, 2: broken values and masks -------------------------------------------------------------
def _nonfinite_origin(c: _Context) -> str | None:
    """The culprit was named because NaN/Inf first appear there in the plain run, while the op
    itself is finite on the oracle's inputs: a wrong input the metrics do not count."""
    p = c.culprit
    if "NaN/Inf start here" not in p.note or p.own_rel_l2 > p.own_tol:
        return None
    where = "in padded rows" if "padded rows" in p.note else "in real rows"
    return (
        f"NaN/Inf first appear here ({p.nonfinite} values, {where}), though this op is finite on the "
        "oracle's inputs: an input differs from the reference in a way the metrics do not count, "
        "such as -inf where MiniMind masks with -1e9"
    )


def _broken_values(c: _Context) -> str | None:
    y, x = c.live(c.y), c.live(c.x)
    if np.isnan(y).all():
        return "never written: every value is still the NaN the output buffer was filled with"
    bad = (np.isnan(y) | np.isinf(y)) & np.isfinite(x)
    if c.op == "self_attn.scores":
        bad &= ~np.isneginf(y)  # -inf is a mask there: the mask checks judge it
    if bad.any():
        return f"NaN/Inf: {int(bad.sum())} of {bad.size} values are not finite where the reference is"
    if (y == 0).all() and (x != 0).any():
        return "all zeros: the op produced zeros (an unwritten or cleared buffer?)"
    return None


def _masks(c: _Context) -> str | None:
    if c.op != "self_attn.scores":
        return None
    S, P = c.x.shape[2], c.x.shape[3]
    query, key = np.arange(S)[:, None] + c.past, np.arange(P)[None, :]  # absolute positions
    differ = (np.isneginf(c.x) != np.isneginf(c.y)) & c.mask.astype(bool)[:, None, :, None]
    if differ.any():
        if not (differ & ~((key == query) & np.isneginf(c.y))).any():
            return "causal mask off by one: the diagonal is masked too (-inf at key j = i: a token cannot see itself)"
        if not (differ & ~((key == query + 1) & ~np.isneginf(c.y))).any():
            return "causal mask off by one: each token also sees the next one (no -inf at key j = i + 1)"
    y, x = c.live(c.y), c.live(c.x)
    if (np.isneginf(x) & (y > MASKED_BELOW)).any():
        return "causal mask missing: scores above the diagonal are not -inf (tokens see the future)"
    padded = np.isfinite(x) & (x <= MASKED_BELOW)
    if (padded & (y > MASKED_BELOW)).any():
        return "padding mask ignored: scores of padded keys are not masked (-1e9 not added)"
    return None


# ---- 3: known mistakes, recomputed from the oracle's inputs ------------------------------------
def _norm_variants(c: _Context) -> str | None:
    sources = {
        "post_attention_layernorm": "attn_residual",
        "self_attn.q_norm": "self_attn.q_proj",
        "self_attn.k_norm": "self_attn.k_proj",
    }
    if c.op == "model.norm":
        src, key = f"model.layers.{c.config.num_hidden_layers - 1}", "model.norm.weight"
    elif c.op == "input_layernorm":
        src, key = c.block_input(), c.prefix(c.op + ".weight")
    elif c.op in sources:
        src, key = c.prefix(sources[c.op]), c.prefix(c.op + ".weight")
    else:
        return None
    x = c.t(src).reshape(c.y.shape)
    w, eps = c.weight(key), c.config.rms_norm_eps
    if c.matches(w * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps)):
        return "RMSNorm eps outside the square root: y = w * x / (sqrt(mean(x^2)) + eps)"
    if c.matches(rmsnorm(x, torch.ones_like(w), eps)):
        return "RMSNorm weight ignored (norm weight ignored): y = x / rms(x), never multiplied by w"
    n = x.shape[-1]
    for k in sorted({n % 16, n % 8} - {0}, reverse=True):
        short = x[..., : n - k].pow(2).sum(-1, keepdim=True) / n
        if c.matches(w * (x * torch.rsqrt(short + eps))):
            return (
                f"RMSNorm's sum of squares misses the last {k} of {n} elements: a vector loop's scalar "
                f"tail dropped ({n} % 16 = {n % 16})"
            )
    for other, value in c.model.state_dict().items():
        if other != key and other.endswith("norm.weight") and value.shape == tuple(w.shape):
            if c.matches(rmsnorm(x, c.weight(other), eps)):
                return f"RMSNorm with the wrong weight: y matches {other} where {key} belongs"
    return None


def _rope_variant(c: _Context) -> str | None:
    if c.op not in ("self_attn.rope_q", "self_attn.rope_k"):
        return None
    which = c.op[-1]
    src = c.prefix(f"self_attn.{which}_norm") if c.config.qk_norm else c.prefix(f"self_attn.{which}_proj")
    x = c.t(src).reshape(c.y.shape)
    start, S = c.past, x.shape[1]  # decode steps rotate by their own positions
    cos_all = torch.from_numpy(c.model.rope_cos.astype(np.float64))
    sin_all = torch.from_numpy(c.model.rope_sin.astype(np.float64))
    cos, sin = cos_all[start : start + S], sin_all[start : start + S]
    pairing = c.config.rope_pairing
    other = "interleaved" if pairing == "half" else "half"
    if c.matches(rope(x, cos, sin, other)):
        return (
            f"RoPE pairing swapped: matches {other} pairs, the model uses {pairing} "
            f"(interleaved (2i, 2i+1) vs half-split (i, i + head_dim/2))"
        )
    if c.matches(rope(x, cos, -sin, pairing)):
        return "RoPE rotates the wrong way: y is the rotation by -theta (the sin terms have the wrong sign)"
    for at in range(0, min(start + 2, len(cos_all) - S) + 1):  # every earlier start, and one past
        if at != start and c.matches(rope(x, cos_all[at : at + S], sin_all[at : at + S], pairing)):
            hint = " (rotated as if at the start: the cache offset is ignored)" if at == 0 and start > 0 else ""
            return (
                f"RoPE at the wrong position: the tokens at positions {start}..{start + S - 1} are rotated "
                f"as positions {at}..{at + S - 1}{hint}"
            )
    return None


def _scores(c: _Context, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    S = q.shape[1]
    scores = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-2, -1)) / scale
    scores = scores + torch.full((S, S), float("-inf"), dtype=scores.dtype).triu(1)
    return scores + (1.0 - torch.from_numpy(c.key_mask)[:, None, None, :].double()) * -1e9


def _strided_keys(k: torch.Tensor, stride: int) -> torch.Tensor:
    """The keys k [B, P, kvh, hd] as read back from a transposed cache [B][kvh][hd][stride] with row
    stride P instead of `stride` (slots past P hold zeros)."""
    B, P, kvh, hd = k.shape
    kt = torch.zeros(B, kvh, hd, stride, dtype=k.dtype)
    kt[..., :P] = k.permute(0, 2, 3, 1)
    at = (torch.arange(hd)[:, None] * P + torch.arange(P)[None, :]).reshape(-1)
    return kt.reshape(B, kvh, hd * stride)[:, :, at].reshape(B, kvh, hd, P).permute(0, 3, 1, 2)


def _scores_variants(c: _Context) -> str | None:
    if c.op != "self_attn.scores" or c.past:  # decode: the cached keys are not in the trace
        return None
    cfg = c.config
    q, k = c.t(c.prefix("self_attn.rope_q")), c.t(c.prefix("self_attn.rope_k"))
    hd = cfg.head_dim
    modulo = k[:, :, [j % cfg.num_key_value_heads for j in range(cfg.num_attention_heads)]]
    if cfg.n_rep > 1 and c.matches(_scores(c, q, modulo, math.sqrt(hd))):
        return "GQA mapping wrong: query head j reads kv head j % kv_heads instead of j // (heads / kv_heads)"
    if c.matches(_scores(c, q, repeat_kv(k, cfg.n_rep), float(hd))):
        return "scale error: scores divided by head_dim instead of sqrt(head_dim)"
    P = k.shape[1]
    for stride in range(-(-P // 16) * 16, -(-P // 16) * 16 + 64, 16):  # the cache's padded lengths
        if stride != P and c.matches(_scores(c, q, repeat_kv(_strided_keys(k, stride), cfg.n_rep), math.sqrt(hd))):
            return (
                f"transposed key cache read with row stride P = {P} instead of its stride {stride}: each key "
                f"is assembled from other positions' dimensions"
            )
    return None


def _cache_slots(c: _Context) -> str | None:
    """Decode: a new key or value stored in the wrong KV-cache slot."""
    if not c.past:
        return None
    if c.op == "self_attn.scores":
        return _key_slot(c)
    if c.op == "self_attn.context":
        return _value_slot(c)
    return None


def _key_slot(c: _Context) -> str | None:
    """Score columns (keys) that hold another key's scores: y[..., j] == x[..., j'] over every query."""
    B, nh, S, P = c.x.shape
    real = c.mask.astype(bool)
    cols_y = np.moveaxis(c.y, 3, 0).transpose(0, 1, 3, 2)[:, real]  # [P, real queries, nh]
    cols_x = np.moveaxis(c.x, 3, 0).transpose(0, 1, 3, 2)[:, real]
    wrong = [j for j in range(P) if _err(cols_y[j], cols_x[j]) > WRONG]
    right = [j for j in range(P) if j not in wrong]
    if not wrong or _err(cols_y[right], cols_x[right]) > AGREE:
        return None
    moved = {j: next((k for k in range(P) if k != j and _err(cols_y[j], cols_x[k]) < AGREE), None) for j in wrong}
    if all(k is None for k in moved.values()):
        return None
    held = "; ".join(
        f"key {j} scores as the reference's key {k}"
        if k is not None
        else f"key {j} holds none of the sequence's keys (an empty or stale slot)"
        for j, k in moved.items()
    )
    return (
        f"KV-cache slot: {held}: a new key was stored in the wrong slot of the key cache "
        f"(past_len {c.past}; the new tokens belong at {c.past}..{P - 1})"
    )


def _value_slot(c: _Context) -> str | None:
    """One new token's value stored at slot j instead of P-1 (and nothing at P-1): per (batch, kv
    head) the overwritten value v_j is unknown, but every query head of the group must agree on it."""
    cfg = c.config
    B, S = c.mask.shape
    if S != 1 or cfg.n_rep < 2:
        return None
    nh, hd, P = cfg.num_attention_heads, cfg.head_dim, c.past + 1
    y, x = c.y.reshape(B, nh, hd), c.x.reshape(B, nh, hd)
    p = c.oracle[c.prefix("self_attn.probs")].astype(np.float64).reshape(B, nh, P)
    v_new = c.oracle[c.prefix("self_attn.v_proj")].astype(np.float64).reshape(B, cfg.num_key_value_heads, hd)
    v_new = np.repeat(v_new, cfg.n_rep, axis=1)  # [B, nh, hd], query head h reads kv head h // n_rep
    missing = x - p[..., P - 1 :] * v_new
    if c.matches(missing):
        return "value cache slot: the new token's value is missing (y = x - p_new * v_new): it was never stored"
    for j in range(P - 1):
        r = (y - missing - p[..., j : j + 1] * v_new).reshape(B, -1, cfg.n_rep, hd)  # = -p_j * v_j per head
        pj = p[..., j].reshape(B, -1, cfg.n_rep, 1)
        v_j = -(pj * r).sum(2, keepdims=True) / np.maximum((pj * pj).sum(2, keepdims=True), 1e-300)  # least squares
        if c.matches(missing + p[..., j : j + 1] * v_new - (pj * v_j).reshape(B, nh, hd)):
            return (
                f"value cache slot: the context matches the reference with the new token's value at key {j} "
                f"instead of {P - 1} and nothing at {P - 1}: the new value was stored in the wrong slot, over "
                f"key {j}'s value"
            )
    return None


def _bf16_bits(x: np.ndarray, how: str) -> np.ndarray:
    """float32(x) cut to bf16 by ``how``: "truncate" (drop the low 16 bits), "away" (round up in
    magnitude), "ties_away" (nearest, ties away from zero)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    add = {"truncate": 0, "away": 0xFFFF, "ties_away": 0x8000}[how]
    return ((u + add) & 0xFFFF0000).astype(np.uint32).view(np.float32).reshape(np.shape(x))


def _cache_rounding(c: _Context) -> str | None:
    """A bf16 KV cache point: the C++ rounded the teacher's float32 value some other way than to
    nearest even (the isolated run rounds exactly the value the oracle rounds)."""
    if c.op not in CACHE_PRE:
        return None
    pre = c.oracle[c.prefix(CACHE_PRE[c.op])].astype(np.float32).reshape(c.y.shape)
    y = c.live(c.y)
    if np.array_equal(y, c.live(round_bf16(pre).astype(np.float64)), equal_nan=True):
        return None
    differ = int((y != c.live(round_bf16(pre).astype(np.float64))).sum())
    ways = {
        "truncate": "truncates (drops the low 16 bits: rounds toward zero)",
        "away": "rounds away from zero",
        "ties_away": "rounds ties away from zero",
    }
    for how, words in ways.items():
        if np.array_equal(y, c.live(_bf16_bits(pre, how).astype(np.float64)), equal_nan=True):
            return (
                f"bf16 rounding wrong: the KV cache {words} instead of round-to-nearest-even "
                f"({differ} of {y.size} values differ)"
            )
    if np.array_equal(y, c.live(pre.astype(np.float64)), equal_nan=True):
        return "bf16 rounding skipped: the KV cache holds the float32 values, not rounded to bfloat16"
    if np.array_equal(y, c.live(round_bf16(y)), equal_nan=True):
        return (
            f"bf16 rounding wrong: the cached values are bfloat16 but not the nearest-even rounding ({differ} differ)"
        )
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


def _residual_variants(c: _Context) -> str | None:
    """The residual adds: y = input + 2 * delta (added twice); y = reference - a shared expert (dropped)."""
    if c.layer is None or c.op not in ("attn_residual", ""):
        return None
    cfg = c.config
    if c.op == "attn_residual":
        src = c.block_input()
        parts = [c.prefix("self_attn.o_proj")]
    else:
        src = c.prefix("attn_residual")
        shared = [c.prefix(f"mlp.shared_experts.{s}") for s in range(cfg.n_shared_experts)]
        parts = [c.prefix("mlp.routed_experts"), *shared] if cfg.use_moe else [c.prefix("mlp.down_proj")]
    delta = sum(c.t(name) for name in parts)
    if c.matches(c.t(src) + 2 * delta):
        return f"residual added twice: y = {src} + 2 * ({' + '.join(parts)})"
    for name in parts:
        if ".shared_experts." in name and c.matches(c.t(c.name) - c.t(name)):
            return (
                f"shared expert {name.rsplit('.', 1)[1]} dropped: y = reference - {name} "
                f"(computed, never added to the MoE output)"
            )
    return None


def _layout_variant(c: _Context) -> str | None:
    """A [B, T, heads, hd] point written [B, heads, T, hd]."""
    if c.point.token_axis != 1 or c.x.shape[1] < 2:
        return None
    B, S = c.x.shape[:2]
    n = c.heads_of(int(np.prod(c.x.shape[2:])))
    if n is None or n < 2 or not c.op.startswith("self_attn"):
        return None
    if c.matches(c.x.reshape(B, S, n, -1).transpose(0, 2, 1, 3).reshape(c.x.shape)):
        return (
            "layout transposed: y is the reference written [B, heads, T, head_dim] (head-major) where "
            "[B, T, heads, head_dim] belongs"
        )
    return None


# ---- 4: another point's value ------------------------------------------------------------------
def _equals_other_point(c: _Context) -> str | None:
    for name, value in c.oracle.items():
        if name == c.name or value.size != c.y.size or value.dtype.kind != "f":
            continue
        if c.matches(value.reshape(c.y.shape)):
            return f"equals the reference's {name}: swapped operands, the wrong buffer, or a skipped op"
    return None


def _accumulated_onto(c: _Context) -> str | None:
    """y - x is another recorded value: the op added onto what its buffer held (the isolated run
    follows the plain C++ run in the same buffers, so the leftover may come from that run)."""
    with np.errstate(invalid="ignore"):  # masked scores: -inf - -inf
        d = c.live(c.y - c.x)
    for run, label in (("oracle", "the reference's"), ("cpp", "the plain C++ run's")):
        for name, value in c.report.runs[run].items():
            if (run == "oracle" and name == c.name) or value.size != c.y.size or value.dtype.kind != "f":
                continue
            if _rel(d, c.live(value.reshape(c.y.shape).astype(np.float64))) < AGREE:
                return (
                    f"accumulator not cleared: y - x equals {label} {name}: the op added onto the value its "
                    f"buffer held (from an earlier layer or forward) instead of starting from zero"
                )
    return None


# ---- 5: an error confined to a part ------------------------------------------------------------
def _confined(y: np.ndarray, x: np.ndarray, bad: np.ndarray) -> bool:
    """The `bad` part is wrong, the rest agrees (bad indexes the first axis)."""
    return bool(bad.any() and not bad.all() and _err(y[bad], x[bad]) > WRONG and _err(y[~bad], x[~bad]) < AGREE)


def _what(y: np.ndarray) -> str:
    return "all zeros" if y.size and (y == 0).all() else "wrong values"


def _vector_tail(c: _Context) -> str | None:
    if c.point.token_axis != 1:
        return None
    B, S = c.mask.shape
    real = np.broadcast_to(c.mask.astype(bool)[:, :, None], (B, S, c.x[0, 0].size)).reshape(-1)
    y, x = c.y.reshape(-1)[real], c.x.reshape(-1)[real]
    n = c.y.size
    for k in sorted({n % 16, n % 8} - {0}, reverse=True):
        if real[-k:].all() and _confined(y, x, np.arange(y.size) >= y.size - k):
            return (
                f"error only in the last {k} of {n} elements (flattened: {_what(y[-k:])}; the rest agree): "
                f"a vector loop's scalar tail dropped or wrong ({n} % 16 = {n % 16})"
            )
    return None


def _heads(c: _Context) -> str | None:
    if c.op not in HEAD_OPS:
        return None
    if c.point.token_axis == 2:  # [B, nh, S, P]: real queries
        y, x = np.moveaxis(c.y, 1, 0)[:, c.mask.astype(bool)], np.moveaxis(c.x, 1, 0)[:, c.mask.astype(bool)]
    else:
        n = c.heads_of(int(np.prod(c.x.shape[2:])))
        if n is None:
            return None
        y, x = (np.moveaxis(c.live(a).reshape(-1, n, c.config.head_dim), 1, 0) for a in (c.y, c.x))
    n = y.shape[0]
    bad = np.array([_err(y[h], x[h]) > WRONG for h in range(n)])
    if not _confined(y, x, bad):
        return None
    heads = [int(h) for h in np.flatnonzero(bad)]
    which = f"head {heads[0]}" if len(heads) == 1 else f"heads {heads}"
    return (
        f"error only in {which} of {n} ({_what(y[bad])}; the other heads agree): a head skipped, or its slice "
        f"written by the wrong loop"
    )


def _rows(c: _Context) -> str | None:
    """A consecutive block of token rows (batch x position flattened, as a GEMM sees them)."""
    if c.point.token_axis != 1:
        return None
    B, S = c.mask.shape
    real = c.mask.reshape(-1).astype(bool)
    y, x = c.y.reshape(B * S, -1), c.x.reshape(B * S, -1)
    bad = np.array([bool(r) and _err(y[i], x[i]) > WRONG for i, r in enumerate(real)])
    span = _span(np.flatnonzero(bad))
    if span is None or 2 * bad.sum() > real.sum() or not _confined(y[real], x[real], bad[real]):
        return None
    first, last = span
    rows = f"token row {first}" if first == last else f"token rows {first}..{last}"
    return (
        f"error only in {rows} of {B * S} (batch x position flattened: {_what(y[bad])}; the other rows agree): "
        f"rows a blocked kernel skipped or left stale (a GEMM row tail, {B * S} % 6 = {B * S % 6}, or a "
        f"row-chunk boundary)"
    )


def _columns(c: _Context) -> str | None:
    """A consecutive block of output columns (the last axis)."""
    if c.point.token_axis != 1:
        return None
    y, x = c.live(c.y).T, c.live(c.x).T  # [columns, rows]
    n = y.shape[0]
    bad = np.array([_err(y[j], x[j]) > WRONG for j in range(n)])
    span = _span(np.flatnonzero(bad))
    if span is None or 2 * bad.sum() > n or not _confined(y, x, bad):
        return None
    first, last = span
    return (
        f"error only in output columns {first}..{last} of {n} ({_what(y[bad])}; the other columns agree): "
        f"outputs a blocked kernel skipped or left stale (a GEMM panel tail: panels of 16, {n} % 16 = {n % 16})"
    )


# ---- 6: precision, sign and scale ----------------------------------------------------------------
def _reduction_growth(c: _Context) -> str:
    """Whether the error grows with the number of terms each value sums."""
    cfg = c.config
    H, I = cfg.hidden_size, (cfg.moe_intermediate_size if cfg.use_moe else cfg.intermediate_size)  # noqa: E741 (I: the FFN width, beside H)
    fixed = {
        "self_attn.q_proj": H,
        "self_attn.k_proj": H,
        "self_attn.v_proj": H,
        "self_attn.o_proj": cfg.q_dim,
        "mlp.gate_proj": H,
        "mlp.up_proj": H,
        "mlp.down_proj": I,
        "lm_head": H,
        "mlp.router_probs": H,
        "self_attn.scores": cfg.head_dim,
        "input_layernorm": H,
        "post_attention_layernorm": H,
        "model.norm": H,
        "self_attn.q_norm": cfg.head_dim,
        "self_attn.k_norm": cfg.head_dim,
    }
    if c.op in fixed:
        return f"every value sums the same {fixed[c.op]} terms, so growth with the reduction length cannot show here"
    if c.op not in ("self_attn.probs", "self_attn.context"):
        return "an elementwise op (no reduction): a per-element approximation (exp, division, a rounding step)"
    B, S = c.mask.shape
    keys = np.cumsum(c.key_mask, axis=1)[:, c.past :]  # real keys each query sees [B, S]
    y, x = (
        a if c.op == "self_attn.probs" else a.reshape(B, S, c.config.num_attention_heads, -1).transpose(0, 2, 1, 3)
        for a in (c.y, c.x)
    )  # [B, nh, S, ...]
    rows = [(int(keys[b, i]), _err(y[b, :, i], x[b, :, i])) for b in range(B) for i in range(S) if c.mask[b, i]]
    lengths = sorted({n for n, _ in rows})
    if len(lengths) < 2:
        return f"every row sums {lengths[0] if lengths else 0} keys, so growth with the reduction length cannot show"
    short = float(np.mean([e for n, e in rows if n == lengths[0]]))
    long = float(np.mean([e for n, e in rows if n == lengths[-1]]))
    grows = long > 2 * short
    return (
        f"it {'grows' if grows else 'does not grow'} with the reduction length (rows over {lengths[0]} keys: "
        f"{short:.1e}, over {lengths[-1]} keys: {long:.1e})"
    )


def _norms(c: _Context) -> tuple[float, float, float] | None:
    """(cosine, ||y|| / ||x||, rel_l2) over the live, finite values, or None."""
    y, x = c.live(c.y), c.live(c.x)
    ok = np.isfinite(x) & np.isfinite(y) & (x > MASKED_BELOW)
    xs, ys = x[ok], y[ok]
    nx, ny = np.linalg.norm(xs), np.linalg.norm(ys)
    if nx == 0 or ny == 0:
        return None
    return float(xs @ ys / (nx * ny)), float(ny / nx), float(np.linalg.norm(ys - xs) / nx)


def _precision(c: _Context) -> str | None:
    found = _norms(c)
    if found is None:
        return None
    cosine, ratio, rel = found
    if rel > PRECISION_MAX * c.floor or abs(ratio - 1) > 0.5 * rel:  # far off, or off along x (a scale)
        return None
    return (
        f"precision loss: rel_l2 {rel:.2e} is {rel / c.floor:.0f}x the float32 floor ({c.floor:.1e}), cosine "
        f"{cosine:.8f}, norm ratio {ratio:.7f}: close to the reference but beyond tolerance (an approximation "
        f"or a lower-precision step, not a wrong formula); {_reduction_growth(c)}"
    )


def _sign_and_scale(c: _Context) -> str | None:
    found = _norms(c)
    if found is None:
        return None
    cosine, ratio, _ = found
    if cosine < -0.999:
        return f"sign flip: cosine {cosine:.4f} (y = -x{f' * {ratio:.4g}' if abs(ratio - 1) > 1e-3 else ''})"
    if cosine > 0.99999 and abs(ratio - 1) > 100 * c.floor:  # a scale moves the norm far beyond rounding
        hint = ""
        hd = c.config.head_dim
        for label, value in (
            (f"1/sqrt(head_dim={hd})", 1 / math.sqrt(hd)),
            (f"sqrt(head_dim={hd})", math.sqrt(hd)),
            ("2", 2.0),
            ("1/2", 0.5),
        ):
            if abs(ratio / value - 1) < 1e-3:
                hint = f" ~ {label}"
        return f"scale error: cosine {cosine:.6f} but ||y|| / ||x|| = {ratio:.6g}{hint}"
    # A per-channel scale: y / x constant down each column (last axis), different across columns.
    y, x = c.live(c.y), c.live(c.x)
    if x.ndim == 2 and x.shape[0] > 1:
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(np.abs(x) > 1e-6, y / x, np.nan)
        col_mean = np.nanmean(r, axis=0)
        spread = np.nanmax(np.abs(r - col_mean), axis=0)
        if np.isfinite(spread).all() and (spread < 1e-3 * np.abs(col_mean)).all() and np.ptp(col_mean) > 1e-3:
            return (
                "per-channel scale: y / x is constant down each channel but differs between channels "
                "(a weight applied twice, ignored, or the wrong one)"
            )
    return None


# ---- 7: permutations ---------------------------------------------------------------------------
def _head_axis_view(c: _Context, array: np.ndarray) -> np.ndarray | None:
    """[tokens, heads, hd] or [B, heads, rest] views for head-structured points, else None."""
    cfg = c.config
    if c.point.token_axis == 2:  # attention [B, nh, S, S]
        return array.reshape(array.shape[0], array.shape[1], -1)
    n = {cfg.q_dim: cfg.num_attention_heads, cfg.kv_dim: cfg.num_key_value_heads}.get(int(np.prod(array.shape[2:])))
    if n is None or n < 2 or c.op.startswith("mlp") or c.op in ("o_proj", "attn_residual"):
        return None
    return array.reshape(array.shape[0] * array.shape[1], n, -1)


def _closest_heads(yv: np.ndarray, xv: np.ndarray) -> list[int]:
    """For each head i of yv [rows, heads, rest], the head of xv it is closest to."""
    n = xv.shape[1]
    return [min(range(n), key=lambda j: _rel(yv[:, i], xv[:, j])) for i in range(n)]


def _permutation(c: _Context) -> str | None:
    xv, yv = _head_axis_view(c, c.x), _head_axis_view(c, c.y)
    if xv is not None and yv is not None:
        if c.point.token_axis == 1:
            real = c.mask.reshape(-1).astype(bool)
            xv, yv = xv[real], yv[real]
        best = _closest_heads(yv, xv)
        n = len(best)
        if (
            best != list(range(n))
            and sorted(best) == list(range(n))
            and all(_rel(yv[:, i], xv[:, best[i]]) < 1e-4 for i in range(n))
        ):
            return f"heads permuted: C++ head i holds reference head {best} [i]"
    hd = c.config.head_dim
    if c.x.shape[-1] == hd or (xv is not None and xv.shape[-1] == hd):
        to_interleaved = np.stack([np.arange(hd // 2), np.arange(hd // 2) + hd // 2], axis=-1).reshape(-1)
        for label, perm in (("interleaved", to_interleaved), ("half-split", np.argsort(to_interleaved))):
            if c.matches(c.x.reshape(-1, hd)[:, perm]):
                return f"pairs inside each head permuted: y is the reference laid out {label}"
    return None


# ---- 8: positions ------------------------------------------------------------------------------
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


CHECKS = (
    _nonfinite_origin,
    _broken_values,
    _masks,
    _norm_variants,
    _rope_variant,
    _scores_variants,
    _cache_slots,
    _cache_rounding,
    _probs_variant,
    _act_variants,
    _head_variant,
    _topk_variant,
    _residual_variants,
    _layout_variant,
    _equals_other_point,
    _accumulated_onto,
    _vector_tail,
    _heads,
    _rows,
    _columns,
    _precision,
    _sign_and_scale,
    _permutation,
    _positions,
)


def diagnose(report: Report) -> str | None:
    """A sentence naming the culprit's pattern, or None when no check recognises it."""
    culprit, model, config = report.culprit, report.meta.get("model"), report.meta.get("config")
    if culprit is None or model is None:
        return None
    if config is None:
        raise ValueError("the report's meta has no config: diagnose reads a report made by build_report")
    c = _Context(report, culprit, model, config)
    for check in CHECKS:
        found = check(c)
        if found:
            return found
    return None
