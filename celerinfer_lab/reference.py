"""The PyTorch reference forward: MiniMind's math, written out op by op, with a named trace.

Written here rather than imported from MiniMind or transformers, so the package runs without
them. Every line below is a MiniMind operation in MiniMind's order and precision:

* RMSNorm: ``weight * (x * rsqrt(mean(x^2) + eps))`` computed in float32 (or wider);
* RoPE from the model file's cos/sin cache, half-split (rotate_half) or interleaved pairs;
* grouped-query attention: query head j reads kv head j // (heads / kv_heads);
* scores = q.k / sqrt(head_dim) + causal -inf above the diagonal + (1 - mask) * -1e9, so a row
  whose every key is masked stays finite; softmax in float32 (or wider);
* the MLP ``down(swiglu(gate(x), up(x)))`` with ``swiglu(g, u) = silu(g) * u``, or MoE (softmax router, top-k, optional
  renormalisation, experts summed in expert order, shared experts added with weight 1);
* final RMSNorm and a tied or untied lm_head.

``dtype=torch.float64`` runs the same math in double precision: the oracle later issues use to
set error floors. The trace (``trace=True``) records every point of ``trace.trace_points``, each
through its ``trace.Point`` (``tr(Point.rope_q, value, layer)``): no name is spelled here. Function
names are the C++ ones (README "One name per concept"): ``rmsnorm``, ``rope``, ``swiglu``, ``mlp``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from .config import ModelConfig
from .errors import UsageError
from .kvcache import check_kv_cache, round_bf16
from .modelfile import Model, input_problem
from .trace import ForwardResult, Point, check_logits_to_keep, kept_positions, point_name  # noqa: F401  (ForwardResult: defined in trace.py, re-exported here)

# Token ids or a mask [B, S] as a caller gives them: a torch tensor, a numpy array or nested lists.
Tokens = torch.Tensor | npt.ArrayLike
# A bf16 cache point's choice: (trace name, the run's value before rounding, its own RNE) -> the values
# the cache holds (runs.py adopts the C++'s admissible roundings; see kvcache.py).
Adopt = Callable[[str, np.ndarray, np.ndarray], np.ndarray]


class _Tracer:
    """Collects op outputs under their trace names; a disabled tracer records nothing and copies nothing.

    With a teacher (trace point name -> value), each op's output is recorded and then replaced by
    the teacher's value, so the next op runs on the teacher's inputs: the recorded value is the
    op's own result on exact inputs (teacher forcing, used to isolate an op's own error).
    """

    def __init__(self, enabled: bool, teacher: dict[str, torch.Tensor] | None = None, adopt: Adopt | None = None):
        self.points: dict[str, torch.Tensor] | None = {} if enabled or teacher else None
        self.teacher = teacher
        self.adopt = adopt  # a bf16 cache's choice of rounding (None: the run's own RNE)

    def to_cache(self, point: Point, value: torch.Tensor, layer: int) -> torch.Tensor:
        """``value`` as a bf16 KV cache holds it (round_bf16, or the adopted choice), traced as ``point``."""
        pre = value.detach().numpy()
        rounded = round_bf16(pre)
        if self.adopt is not None:
            rounded = self.adopt(point_name(point, layer), pre, rounded)
        cached = torch.from_numpy(np.ascontiguousarray(rounded)).to(value.dtype).reshape(value.shape)
        return self(point, cached, layer)

    def __call__(
        self, point: Point, value: torch.Tensor, layer: int | None = None, index: int | None = None
    ) -> torch.Tensor:
        if self.points is None:
            return value
        name = point_name(point, layer, index)
        self.points[name] = value.detach().clone()
        if self.teacher is not None and name in self.teacher:
            return self.teacher[name].to(value.dtype).reshape(value.shape)
        return value


class OpTimer(_Tracer):
    """A tracer that times instead of recording (the profile, profile.py): at each trace point, the
    seconds since the previous one (the first: since the forward began). torch runs CPU ops
    synchronously, so that is the op's time, Python around it included. Nothing is copied."""

    def __init__(self) -> None:
        super().__init__(False)
        self.times: list[tuple[Point, int | None, int | None, float]] = []
        self.last = time.perf_counter()

    def start(self) -> None:
        self.times, self.last = [], time.perf_counter()

    def __call__(
        self, point: Point, value: torch.Tensor, layer: int | None = None, index: int | None = None
    ) -> torch.Tensor:
        now = time.perf_counter()
        self.times.append((point, layer, index, now - self.last))
        self.last = now
        return value


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """MiniMind's ``.float()``: at least float32, but float64 stays float64 for the oracle."""
    return torch.promote_types(dtype, torch.float32)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(_compute_dtype(x.dtype))
    return (weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairing: str) -> torch.Tensor:
    """x [B, S, n, hd] rotated; cos/sin [S, hd] (the new tokens' rows) with the halves concatenated."""
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


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation, silu(gate) * up, elementwise."""
    return F.silu(gate) * up


def mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    tr: _Tracer | None = None,
    layer: int | None = None,
) -> torch.Tensor:
    """The whole feed-forward, down(swiglu(gate(x), up(x))); traces gate/up/act of ``layer`` when given ``tr``
    (experts are not traced one by one)."""
    trace = tr if tr is not None else (lambda _point, value, _layer: value)
    gate = trace(Point.gate_proj, F.linear(x, w_gate), layer)
    up = trace(Point.up_proj, F.linear(x, w_up), layer)
    act = trace(Point.act, swiglu(gate, up), layer)
    return F.linear(act, w_down)


def _mlp_weights(w: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gate, up and down weights of the feed-forward (or expert) at ``prefix``, in mlp()'s order."""
    return w[f"{prefix}.gate_proj.weight"], w[f"{prefix}.up_proj.weight"], w[f"{prefix}.down_proj.weight"]


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


def _as_int64(value: Tokens, name: str, integer: bool = True) -> torch.Tensor:
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

    def __init__(self, model: Model, dtype: torch.dtype = torch.float32, kv_cache: str = "f32"):
        model.check_sidecar()  # the copies below read every page of a memory-mapped sidecar
        self.config: ModelConfig = model.config
        self.dtype = dtype
        self.kv_cache = check_kv_cache(kv_cache)  # "bf16": keys and values rounded as they join the cache
        # np.array copies: the loaded arrays are read-only views of the decoded file bytes. A bf16/q8
        # model's reduced weights are decoded from their stored form in float64 (exact) when the forward
        # runs in float64: the precision-matched oracle of the reduced-precision kernel sets.
        exact = np.float64 if dtype == torch.float64 else np.float32
        self.w = {k: torch.from_numpy(np.array(model.weight_values(k, exact))).to(dtype) for k in model.weights}
        if self.config.tie_word_embeddings:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        self.rope_cos = torch.from_numpy(np.array(model.rope_cos)).to(dtype)
        self.rope_sin = torch.from_numpy(np.array(model.rope_sin)).to(dtype)
        self.input_ids = torch.from_numpy(np.array(model.input_ids, dtype=np.int64))
        self.attention_mask = torch.from_numpy(np.array(model.attention_mask, dtype=np.int64))

    @torch.inference_mode()
    def forward(
        self,
        input_ids: Tokens | None = None,
        attention_mask: Tokens | None = None,
        trace: bool = False,
        teacher: dict[str, np.ndarray] | None = None,
        cache: KVCache | None = None,
        adopt: Adopt | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Logits [B, S, V] and, with trace=True, every trace point. Defaults: the file's inputs.

        ``input_ids`` and ``attention_mask`` [B, S] may be torch tensors, numpy arrays (as the
        Model holds them) or nested lists, checked as the C++ side checks them
        (``NativeModel.check_inputs``); given ids without a mask, every position is real.

        ``teacher``: trace point values that replace each op's output once recorded (see _Tracer).
        ``cache``: decode incrementally: the new tokens sit at positions cache.length..., attend to
        the cached keys too, and are appended to the cache; attention_mask then covers all keys
        [B, cache.length + S].
        ``adopt``: with a bf16 KV cache, chooses the values each cache point holds (see kvcache.py).
        ``logits_to_keep``: MiniMind's argument: lm_head over the last L positions only, logits
        [B, L, V] (0: every position).
        """
        keep = check_logits_to_keep(logits_to_keep)
        ids, mask = self._inputs(input_ids, attention_mask, cache.length if cache is not None else 0)
        forced = None if teacher is None else {k: torch.from_numpy(np.asarray(v)) for k, v in teacher.items()}
        return self._forward(ids, mask, _Tracer(trace, forced, adopt), cache, keep)

    @torch.inference_mode()
    def timed_forward(
        self,
        input_ids: Tokens | None = None,
        attention_mask: Tokens | None = None,
        cache: KVCache | None = None,
        timer: OpTimer | None = None,
    ) -> tuple[torch.Tensor, OpTimer]:
        """forward() with an OpTimer at its trace points (the profile): logits and the timer, whose
        ``times`` hold (point, layer, index, seconds since the previous point) in forward order."""
        ids, mask = self._inputs(input_ids, attention_mask, cache.length if cache is not None else 0)
        timer = timer or OpTimer()
        timer.start()
        logits, _ = self._forward(ids, mask, timer, cache)
        return logits, timer

    def training_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, V] for ids [B, S] (no padding) outside inference mode, so that gradients
        reach weights set to require them: the same forward, for train.py."""
        ids, mask = self._inputs(input_ids, None, 0)
        return self._forward(ids, mask, _Tracer(False), None)[0]

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, tr: _Tracer, cache: KVCache | None, logits_to_keep: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        cfg, w = self.config, self.w
        start = cache.length if cache is not None else 0
        self.config.validate(seq_len=start + ids.shape[1])
        h = tr(Point.embed_tokens, F.embedding(ids, w["model.embed_tokens.weight"]))
        cos, sin = self.rope_cos[start : start + ids.shape[1]], self.rope_sin[start : start + ids.shape[1]]
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            x = tr(Point.input_layernorm, rmsnorm(h, w[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps), i)
            attn = self._attention(x, mask, cos, sin, tr, cache, i)
            h = tr(Point.attn_residual, h + attn, i)
            x = tr(
                Point.post_attention_layernorm,
                rmsnorm(h, w[f"{p}.post_attention_layernorm.weight"], cfg.rms_norm_eps),
                i,
            )
            if cfg.use_moe:
                y = self._moe(x, tr, i)
            else:
                y = tr(Point.down_proj, mlp(x, *_mlp_weights(w, f"{p}.mlp"), tr, i), i)
            h = tr(Point.block, h + y, i)
        h = tr(Point.norm, rmsnorm(h, w["model.norm.weight"], cfg.rms_norm_eps))
        kept = h[:, h.shape[1] - kept_positions(h.shape[1], logits_to_keep) :]  # MiniMind: h[:, -logits_to_keep:]
        logits = tr(Point.lm_head, F.linear(kept, w["lm_head.weight"]))
        return logits, tr.points

    def _inputs(
        self, input_ids: Tokens | None, attention_mask: Tokens | None, past: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, S] and mask [B, past + S] as int64 tensors (default: the file's inputs), checked by
        modelfile.input_problem, the rule the C++ side and the model file follow too."""
        ids = self.input_ids if input_ids is None else _as_int64(input_ids, "input_ids")
        if attention_mask is not None:
            mask = _as_int64(attention_mask, "attention_mask", integer=False)
        elif input_ids is None:
            mask = self.attention_mask
        else:  # ids without a mask: every position is real
            mask = (
                torch.ones(ids.shape[0], past + ids.shape[1], dtype=torch.int64) if ids.ndim == 2 else ids[:0]
            )  # bad ids: reported first
        problem = input_problem(ids.numpy(), mask.numpy(), self.config.vocab_size, past)
        if problem:
            raise UsageError(problem)
        return ids, mask

    def _attention(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        tr: _Tracer,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        cfg, w, i = self.config, self.w, layer
        p = f"model.layers.{layer}.self_attn"
        B, S, _ = x.shape
        nh, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = tr(Point.q_proj, F.linear(x, w[f"{p}.q_proj.weight"]), i)
        k = tr(Point.k_proj, F.linear(x, w[f"{p}.k_proj.weight"]), i)
        v = tr(Point.v_proj, F.linear(x, w[f"{p}.v_proj.weight"]), i)
        q, k, v = q.view(B, S, nh, hd), k.view(B, S, kvh, hd), v.view(B, S, kvh, hd)
        if cfg.qk_norm:
            q = tr(Point.q_norm, rmsnorm(q, w[f"{p}.q_norm.weight"], cfg.rms_norm_eps), i)
            k = tr(Point.k_norm, rmsnorm(k, w[f"{p}.k_norm.weight"], cfg.rms_norm_eps), i)
        q = tr(Point.rope_q, rope(q, cos, sin, cfg.rope_pairing), i)
        k = tr(Point.rope_k, rope(k, cos, sin, cfg.rope_pairing), i)
        if self.kv_cache == "bf16":  # a bf16 cache: the new keys and values rounded as they join it
            k, v = tr.to_cache(Point.k_cached, k, i), tr.to_cache(Point.v_cached, v, i)
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
        scores = tr(Point.scores, scores, i)
        probs = tr(Point.probs, F.softmax(scores.to(_compute_dtype(scores.dtype)), dim=-1).type_as(q), i)
        context = tr(Point.context, (probs @ v).transpose(1, 2).reshape(B, S, nh * hd), i)
        return tr(Point.o_proj, F.linear(context, w[f"{p}.o_proj.weight"]), i)

    def _moe(self, x: torch.Tensor, tr: _Tracer, layer: int) -> torch.Tensor:
        cfg, w, i = self.config, self.w, layer
        p = f"model.layers.{layer}.mlp"
        B, S, H = x.shape
        k = cfg.num_experts_per_tok
        flat = x.reshape(-1, H)
        router_probs = F.softmax(F.linear(flat, w[f"{p}.gate.weight"]), dim=-1)
        # sorted=True: the trace lists the chosen experts by descending probability.
        topk_weight, topk_idx = torch.topk(router_probs, k=k, dim=-1, sorted=True)
        if cfg.uses_topk_renorm:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        router_probs = tr(Point.router_probs, router_probs.view(B, S, -1), i).reshape(-1, cfg.num_experts)
        topk_idx = tr(Point.topk_idx, topk_idx.view(B, S, k), i).reshape(-1, k).long()
        topk_weight = tr(Point.topk_weight, topk_weight.view(B, S, k), i).reshape(-1, k)
        routed = torch.zeros_like(flat)
        for e in range(cfg.num_experts):  # in expert order, as MiniMind accumulates
            chosen = topk_idx == e
            if chosen.any():
                tokens = chosen.any(dim=-1).nonzero().flatten()
                weight = topk_weight[chosen].view(-1, 1)
                e_out = mlp(flat[tokens], *_mlp_weights(w, f"{p}.experts.{e}"))
                routed.index_add_(0, tokens, e_out * weight)
        out = tr(Point.routed_experts, routed.view(B, S, H), i)
        for s in range(cfg.n_shared_experts):  # MiniMind adds each shared expert in turn, weight 1
            shared = mlp(x, *_mlp_weights(w, f"{p}.shared_experts.{s}"))
            out = out + tr(Point.shared_expert, shared, i, s)
        return out


def decode_steps(
    ref: "ReferenceModel",
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    feed: np.ndarray,
    trace: bool = False,
    teachers: list[dict[str, np.ndarray]] | None = None,
    adopts: list[Adopt] | None = None,
) -> list[tuple[np.ndarray, dict[str, np.ndarray] | None]]:
    """Prefill the prompt, then feed the tokens of ``feed`` [B, N] one step at a time with the KV
    cache. One (logits, trace) per forward: the prefill, then N steps. ``teachers`` / ``adopts``: one
    per forward (see ReferenceModel.forward)."""
    cache = KVCache.empty()
    ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
    mask = torch.from_numpy(np.asarray(attention_mask, dtype=np.int64))
    tokens = torch.from_numpy(np.asarray(feed, dtype=np.int64))
    out = []
    for step in range(tokens.shape[1] + 1):
        teacher = teachers[step] if teachers else None
        adopt = adopts[step] if adopts else None
        logits, points = ref.forward(ids, mask, trace=trace, teacher=teacher, cache=cache, adopt=adopt)
        out.append((logits.numpy(), None if points is None else {k: v.numpy() for k, v in points.items()}))
        if step < tokens.shape[1]:
            ids = tokens[:, step : step + 1]
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    return out


def greedy_generate(
    ref: "ReferenceModel",
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    new_tokens: int,
    after_prefill: Callable[[], object] | None = None,
    on_step: Callable[[int], object] | None = None,
) -> np.ndarray:
    """Prefill the prompt, then decode ``new_tokens`` greedily with the KV cache: [B, new_tokens].
    ``after_prefill()`` is called once the prompt is processed (benchmarks time the decode alone),
    ``on_step(step)`` once each step's token is chosen (step 0: the prefill's)."""
    cache = KVCache.empty()
    ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
    mask = torch.from_numpy(np.asarray(attention_mask, dtype=np.int64))
    tokens = []
    for step in range(new_tokens):
        if step == 1 and after_prefill is not None:
            after_prefill()
        # the prompt's last position only, as MiniMind's generate asks (logits_to_keep=1)
        logits, _ = ref.forward(ids, mask, cache=cache, logits_to_keep=1)
        ids = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(ids)
        if on_step is not None:
            on_step(step)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    return torch.cat(tokens, dim=1).numpy()


def reference_forward(
    model: Model,
    dtype: torch.dtype = torch.float32,
    trace: bool = False,
    teacher: dict[str, np.ndarray] | None = None,
    kv_cache: str = "f32",
    adopt: Adopt | None = None,
    logits_to_keep: int = 0,
) -> ForwardResult:
    """Run the reference on the model file's own inputs; numpy logits and trace. ``kv_cache``: "f32"
    or "bf16" (keys and values rounded as they join the cache); ``adopt`` and ``logits_to_keep``: see
    ReferenceModel.forward."""
    ref = ReferenceModel(model, dtype, kv_cache)
    logits, points = ref.forward(trace=trace, teacher=teacher, adopt=adopt, logits_to_keep=logits_to_keep)
    return ForwardResult(
        logits=logits.numpy(),
        trace=None if points is None else {k: v.numpy() for k, v in points.items()},
    )
