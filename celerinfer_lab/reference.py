"""The PyTorch reference forward: MiniMind's math, written out op by op, with a named trace.

Written here rather than imported from MiniMind or transformers, so the package runs without
them. Every line below is a MiniMind operation in MiniMind's order and precision:

* RMSNorm: ``weight * (x * rsqrt(mean(x^2) + eps))`` computed in float32 (or wider);
* RoPE from the model file's cos/sin cache, half-split (rotate_half) or interleaved pairs;
* grouped-query attention: query head j reads kv head j // (heads / kv_heads);
* scores = q.k / sqrt(head_dim) + causal -inf above the diagonal + (1 - mask) * -1e9, so a row
  whose every key is masked stays finite; softmax in float32 (or wider);
* SwiGLU ``down(silu(gate(x)) * up(x))``, or MoE (softmax router, top-k, optional
  renormalisation, experts summed in expert order, shared experts added with weight 1);
* final RMSNorm and a tied or untied lm_head.

``dtype=torch.float64`` runs the same math in double precision: the oracle later issues use to
set error floors. The trace (``trace=True``) records every point of ``trace.trace_points``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig
from .modelfile import Model
from .trace import ForwardResult  # noqa: F401  (defined in trace.py, re-exported here)


class _Tracer:
    """Collects named op outputs; a disabled tracer records nothing and copies nothing.

    With a teacher (trace point name -> value), each op's output is recorded and then replaced by
    the teacher's value, so the next op runs on the teacher's inputs: the recorded value is the
    op's own result on exact inputs (teacher forcing, used to isolate an op's own error).
    """

    def __init__(self, enabled: bool, teacher: dict[str, torch.Tensor] | None = None):
        self.points: dict[str, torch.Tensor] | None = {} if enabled or teacher else None
        self.teacher = teacher

    def __call__(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if self.points is None:
            return value
        self.points[name] = value.detach().clone()
        if self.teacher is not None and name in self.teacher:
            return self.teacher[name].to(value.dtype).reshape(value.shape)
        return value


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """MiniMind's ``.float()``: at least float32, but float64 stays float64 for the oracle."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(_compute_dtype(x.dtype))
    return (weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairing: str) -> torch.Tensor:
    """x [B, S, n, hd]; cos/sin [S, hd] with the halves concatenated."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    if pairing == "half":
        return (x * cos + rotate_half(x) * sin).to(x.dtype)
    # Interleaved: dimensions (2i, 2i+1) form pair i and rotate by frequency i (complex multiply).
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).to(x.dtype)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, S, kvh, hd] -> [B, S, kvh * n_rep, hd]: kv head g serves query heads g*n_rep ... g*n_rep+n_rep-1."""
    if n_rep == 1:
        return x
    B, S, kvh, hd = x.shape
    return x[:, :, :, None, :].expand(B, S, kvh, n_rep, hd).reshape(B, S, kvh * n_rep, hd)


def swiglu(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    tr: _Tracer | None = None,
    prefix: str = "",
) -> torch.Tensor:
    trace = tr if tr is not None else (lambda _name, value: value)
    gate = trace(f"{prefix}.gate_proj", F.linear(x, w_gate))
    up = trace(f"{prefix}.up_proj", F.linear(x, w_up))
    act = trace(f"{prefix}.act", F.silu(gate) * up)
    return F.linear(act, w_down)


@dataclass
class KVCache:
    """Keys (after RoPE) and values of every layer so far, [B, P, kv_heads, head_dim] each."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def empty(cls) -> "KVCache":
        return cls([], [])

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[1]) if self.keys else 0


def _as_int64(value, name: str, integer: bool = True) -> torch.Tensor:
    """A torch tensor, numpy array or nested list as an int64 tensor; ``integer``: refuse other dtypes
    (ids must be integers; a mask of 0.0/1.0 or booleans is accepted, as on the C++ side)."""
    t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))
    if integer and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name} must be integers, got {t.dtype}")
    if not integer and not ((t == 0) | (t == 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1")
    return t.to(torch.int64)


class ReferenceModel:
    """Weights as torch tensors in one dtype, ready for repeated forwards (benchmarks, tests)."""

    def __init__(self, model: Model, dtype: torch.dtype = torch.float32):
        model.check_sidecar()  # the copies below read every page of a memory-mapped sidecar
        self.config: ModelConfig = model.config
        self.dtype = dtype
        # np.array copies: the loaded arrays are read-only views of the decoded file bytes.
        self.w = {k: torch.from_numpy(np.array(v)).to(dtype) for k, v in model.weights.items()}
        if self.config.tie_word_embeddings:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        self.rope_cos = torch.from_numpy(np.array(model.rope_cos)).to(dtype)
        self.rope_sin = torch.from_numpy(np.array(model.rope_sin)).to(dtype)
        self.input_ids = torch.from_numpy(np.array(model.input_ids, dtype=np.int64))
        self.attention_mask = torch.from_numpy(np.array(model.attention_mask, dtype=np.int64))

    @torch.inference_mode()
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        trace: bool = False,
        teacher: dict[str, np.ndarray] | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Logits [B, S, V] and, with trace=True, every trace point. Defaults: the file's inputs.

        ``input_ids`` and ``attention_mask`` [B, S] may be torch tensors, numpy arrays (as the
        Model holds them) or nested lists, checked as the C++ side checks them
        (``NativeModel.check_inputs``); given ids without a mask, every position is real.

        ``teacher``: trace point values that replace each op's output once recorded (see _Tracer).
        ``cache``: decode incrementally: the new tokens sit at positions cache.length..., attend to
        the cached keys too, and are appended to the cache; attention_mask then covers all keys
        [B, cache.length + S].
        """
        ids, mask = self._inputs(input_ids, attention_mask, cache.length if cache is not None else 0)
        forced = None if teacher is None else {k: torch.from_numpy(np.asarray(v)) for k, v in teacher.items()}
        cfg, w, tr = self.config, self.w, _Tracer(trace, forced)
        start = cache.length if cache is not None else 0
        self.config.validate(seq_len=start + ids.shape[1])
        if mask.shape != (ids.shape[0], start + ids.shape[1]):
            raise ValueError(
                f"attention_mask has shape {list(mask.shape)}, expected [batch, past + new] = "
                f"{[ids.shape[0], start + ids.shape[1]]}"
            )
        h = tr("model.embed_tokens", F.embedding(ids, w["model.embed_tokens.weight"]))
        cos, sin = self.rope_cos[start : start + ids.shape[1]], self.rope_sin[start : start + ids.shape[1]]
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            x = tr(f"{p}.input_layernorm", rms_norm(h, w[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps))
            attn = self._attention(x, mask, cos, sin, p, tr, cache, i)
            h = tr(f"{p}.attn_residual", h + attn)
            x = tr(
                f"{p}.post_attention_layernorm",
                rms_norm(h, w[f"{p}.post_attention_layernorm.weight"], cfg.rms_norm_eps),
            )
            if cfg.use_moe:
                mlp = self._moe(x, f"{p}.mlp", tr)
            else:
                mlp = tr(
                    f"{p}.mlp.down_proj",
                    swiglu(
                        x,
                        w[f"{p}.mlp.gate_proj.weight"],
                        w[f"{p}.mlp.up_proj.weight"],
                        w[f"{p}.mlp.down_proj.weight"],
                        tr,
                        f"{p}.mlp",
                    ),
                )
            h = tr(p, h + mlp)
        h = tr("model.norm", rms_norm(h, w["model.norm.weight"], cfg.rms_norm_eps))
        logits = tr("lm_head", F.linear(h, w["lm_head.weight"]))
        return logits, tr.points

    def _inputs(self, input_ids, attention_mask, past: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, S] and mask [B, past + S] as int64 tensors (default: the file's inputs), checked."""
        if input_ids is None:
            ids = self.input_ids
            mask = (
                self.attention_mask
                if attention_mask is None
                else _as_int64(attention_mask, "attention_mask", integer=False)
            )
        else:
            ids = _as_int64(input_ids, "input_ids")
            if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
                raise ValueError(f"input_ids must have shape [batch, seq_len], got {list(ids.shape)}")
            if ids.min() < 0 or ids.max() >= self.config.vocab_size:
                raise ValueError(
                    f"input_ids hold {int(ids.min())}..{int(ids.max())}, outside the vocabulary "
                    f"[0, {self.config.vocab_size})"
                )
            mask = (
                torch.ones(ids.shape[0], past + ids.shape[1], dtype=torch.int64)
                if attention_mask is None
                else _as_int64(attention_mask, "attention_mask", integer=False)
            )
        return ids, mask

    def _attention(self, x, mask, cos, sin, p: str, tr: _Tracer, cache: KVCache | None, layer: int) -> torch.Tensor:
        cfg, w = self.config, self.w
        B, S, _ = x.shape
        nh, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = tr(f"{p}.self_attn.q_proj", F.linear(x, w[f"{p}.self_attn.q_proj.weight"]))
        k = tr(f"{p}.self_attn.k_proj", F.linear(x, w[f"{p}.self_attn.k_proj.weight"]))
        v = tr(f"{p}.self_attn.v_proj", F.linear(x, w[f"{p}.self_attn.v_proj.weight"]))
        q, k, v = q.view(B, S, nh, hd), k.view(B, S, kvh, hd), v.view(B, S, kvh, hd)
        if cfg.qk_norm:
            q = tr(f"{p}.self_attn.q_norm", rms_norm(q, w[f"{p}.self_attn.q_norm.weight"], cfg.rms_norm_eps))
            k = tr(f"{p}.self_attn.k_norm", rms_norm(k, w[f"{p}.self_attn.k_norm.weight"], cfg.rms_norm_eps))
        q = tr(f"{p}.self_attn.rope_q", apply_rope(q, cos, sin, cfg.rope_pairing))
        k = tr(f"{p}.self_attn.rope_k", apply_rope(k, cos, sin, cfg.rope_pairing))
        if cache is not None:  # decode: the new keys/values join the cached ones
            if layer < len(cache.keys):
                k, v = torch.cat([cache.keys[layer], k], dim=1), torch.cat([cache.values[layer], v], dim=1)
                cache.keys[layer], cache.values[layer] = k, v
            else:
                cache.keys.append(k)
                cache.values.append(v)
        q = q.transpose(1, 2)  # [B, nh, S, hd]
        k = repeat_kv(k, cfg.n_rep).transpose(1, 2)  # [B, nh, P, hd], P = past + S
        v = repeat_kv(v, cfg.n_rep).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        causal = torch.zeros_like(scores[0, 0])  # MiniMind: -inf above the diagonal of the new block
        causal[:, -S:] = torch.full((S, S), float("-inf"), dtype=scores.dtype).triu(1)
        scores = scores + causal
        scores = scores + (1.0 - mask[:, None, None, :].to(scores.dtype)) * -1e9
        scores = tr(f"{p}.self_attn.scores", scores)
        probs = tr(f"{p}.self_attn.probs", F.softmax(scores.to(_compute_dtype(scores.dtype)), dim=-1).type_as(q))
        context = tr(f"{p}.self_attn.context", (probs @ v).transpose(1, 2).reshape(B, S, nh * hd))
        return tr(f"{p}.self_attn.o_proj", F.linear(context, w[f"{p}.self_attn.o_proj.weight"]))

    def _moe(self, x: torch.Tensor, p: str, tr: _Tracer) -> torch.Tensor:
        cfg, w = self.config, self.w
        B, S, H = x.shape
        k = cfg.num_experts_per_tok
        flat = x.reshape(-1, H)
        router_probs = F.softmax(F.linear(flat, w[f"{p}.gate.weight"]), dim=-1)
        # sorted=True: the trace lists the chosen experts by descending probability.
        topk_weight, topk_idx = torch.topk(router_probs, k=k, dim=-1, sorted=True)
        if cfg.uses_topk_renorm:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        router_probs = tr(f"{p}.router_probs", router_probs.view(B, S, -1)).reshape(-1, cfg.num_experts)
        topk_idx = tr(f"{p}.topk_idx", topk_idx.view(B, S, k)).reshape(-1, k).long()
        topk_weight = tr(f"{p}.topk_weight", topk_weight.view(B, S, k)).reshape(-1, k)
        routed = torch.zeros_like(flat)
        for e in range(cfg.num_experts):  # in expert order, as MiniMind accumulates
            chosen = topk_idx == e
            if chosen.any():
                tokens = chosen.any(dim=-1).nonzero().flatten()
                weight = topk_weight[chosen].view(-1, 1)
                e_out = swiglu(
                    flat[tokens], *(w[f"{p}.experts.{e}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
                )
                routed.index_add_(0, tokens, e_out * weight)
        out = tr(f"{p}.routed_experts", routed.view(B, S, H))
        for s in range(cfg.n_shared_experts):  # MiniMind adds each shared expert in turn, weight 1
            shared = swiglu(
                x, *(w[f"{p}.shared_experts.{s}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
            )
            out = out + tr(f"{p}.shared_experts.{s}", shared)
        return out


def decode_steps(
    ref: "ReferenceModel",
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    feed: np.ndarray,
    trace: bool = False,
    teachers: list[dict[str, np.ndarray]] | None = None,
) -> list[tuple[np.ndarray, dict[str, np.ndarray] | None]]:
    """Prefill the prompt, then feed the tokens of ``feed`` [B, N] one step at a time with the KV
    cache. One (logits, trace) per forward: the prefill, then N steps. ``teachers``: one teacher per
    forward (see ReferenceModel.forward)."""
    cache = KVCache.empty()
    ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
    mask = torch.from_numpy(np.asarray(attention_mask, dtype=np.int64))
    feed = torch.from_numpy(np.asarray(feed, dtype=np.int64))
    out = []
    for step in range(feed.shape[1] + 1):
        teacher = teachers[step] if teachers else None
        logits, points = ref.forward(ids, mask, trace=trace, teacher=teacher, cache=cache)
        out.append((logits.numpy(), None if points is None else {k: v.numpy() for k, v in points.items()}))
        if step < feed.shape[1]:
            ids = feed[:, step : step + 1]
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    return out


def greedy_generate(
    ref: "ReferenceModel", input_ids: np.ndarray, attention_mask: np.ndarray, new_tokens: int, after_prefill=None
) -> np.ndarray:
    """Prefill the prompt, then decode ``new_tokens`` greedily with the KV cache: [B, new_tokens].
    ``after_prefill()`` is called once the prompt is processed (benchmarks time the decode alone)."""
    cache = KVCache.empty()
    ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
    mask = torch.from_numpy(np.asarray(attention_mask, dtype=np.int64))
    tokens = []
    for step in range(new_tokens):
        if step == 1 and after_prefill is not None:
            after_prefill()
        logits, _ = ref.forward(ids, mask, cache=cache)
        ids = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(ids)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    return torch.cat(tokens, dim=1).numpy()


def reference_forward(
    model: Model, dtype: torch.dtype = torch.float32, trace: bool = False, teacher: dict[str, np.ndarray] | None = None
) -> ForwardResult:
    """Run the reference on the model file's own inputs; numpy logits and trace."""
    logits, points = ReferenceModel(model, dtype).forward(trace=trace, teacher=teacher)
    return ForwardResult(
        logits=logits.numpy(),
        trace=None if points is None else {k: v.numpy() for k, v in points.items()},
    )
