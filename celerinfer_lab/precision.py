"""What reduced precision costs: the float32 model against its bf16/q8 weights, both in the float64
reference (issue 14's second question; the first, "is the kernel correct?", is compare's).

Nothing here runs C++: both sides are ``ReferenceModel(..., torch.float64)``, one on the float32
model, one on ``model.as_format(fmt)`` (its reduced weights encoded and decoded exactly), so every
difference is the format's and none is a kernel's or float32 arithmetic's.

* per trace point: SQNR in dB over the real (unpadded) positions, ``sqnr_db``;
* the logits: mean KL(float32 || reduced) over real positions, top-1 agreement, max |logit error|;
* which layer loses the most, two ways:

  - **one layer at a time**: only that layer's reduced weights in the format (``with_reduced``),
    the rest float32; the final KL of each. Each layer's cost alone; they need not add up to the
    whole model's (errors compound, or cancel).
  - **splicing** (``splice_contributions``): run the float32 model with every trace point up to
    op i replaced by the reduced run's value (the teacher hook), so the state after op i is the
    reduced model's and everything after runs in float32 precision; KL_i is the final KL of that
    run, and op i contributes KL_i - KL_(i-1). This prefix scheme is chosen over its dual (exact
    everywhere except op i) because it attributes cleanly: the contributions telescope, so they
    add up to the whole model's KL exactly (KL_0 = 0, the last splice is the reduced model), and an
    op that reads no reduced weight (a norm, RoPE, softmax) contributes exactly 0, since it
    computes the same float64 function of the same inputs on both sides. The dual measures each op
    in isolation; KL is quadratic in small perturbations, so those isolated KLs leave out every
    cross term and do not add up to anything. A contribution can be negative (a later op's error
    cancelling part of an earlier one's).

``fmt`` is "f32", "bf16", "q8" or any ``WeightFormat``: a name and the function giving a weight's
values in that format (a test plants a layer-specific perturbation as a fake format).

``kv_cache="bf16"``: the reduced side also rounds every key and value to bfloat16 as it joins the
KV cache (kvcache.py), so ``precision_cost(model, "f32", kv_cache="bf16")`` is what the bf16 cache
alone costs. The one-group-at-a-time runs keep the bf16 cache throughout (each group's weights on
top of it), and splicing walks the float32 model's points: the cache rounding is carried into the
float32 run by the next spliced point (the scores).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Collection, Iterable

import numpy as np

from .config import ModelConfig
from .errors import UsageError
from .kvcache import check_kv_cache
from .metrics import errors, kl_per_token, live_rows
from .modelfile import Model
from .quantize import check_weight_format, decode, encode
from .schema import reduced_weights
from .trace import trace_points

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .reference import ReferenceModel


@dataclass(frozen=True)
class WeightFormat:
    """A weight format as the precision cost sees it: ``values(name, w)`` gives the float32 values a
    weight ``w`` keeps in the format (its stored form decoded). It is applied to the weights a bf16/q8
    model stores reduced (schema.reduced_weights: projections, experts, the head, a tied embedding),
    never to norms or the MoE router."""

    name: str
    values: Callable[[str, np.ndarray], np.ndarray]

    @classmethod
    def of(cls, fmt: str | WeightFormat) -> WeightFormat:
        if isinstance(fmt, WeightFormat):
            return fmt
        check_weight_format(fmt)

        def values(name: str, w: np.ndarray) -> np.ndarray:
            # bf16 and Q8_0 decode exactly into float32 too (a bf16 is a truncated float32; a Q8_0
            # weight is an int8 times a float16: at most 18 significant bits)
            return decode(encode(w, fmt, name), fmt, tuple(w.shape), np.float32)

        return cls(fmt, values)


# ---- the numbers --------------------------------------------------------------------------------
def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - test)^2): +inf when the error is 0 (identical, or both all
    zero), -inf when ref is all zero and test is not. Masked attention scores (-inf, <= -1e8) are
    left out, as compare does (metrics.errors)."""
    return errors(np.asarray(ref), np.asarray(test)).sqnr_db


def mean_kl(ref_logits: np.ndarray, test_logits: np.ndarray, mask: np.ndarray) -> float:
    """Mean KL(softmax(ref) || softmax(test)) in nats over the positions where ``mask`` [B, S] is 1."""
    real = np.asarray(mask).astype(bool)
    return float(kl_per_token(ref_logits, test_logits)[real].mean()) if real.any() else 0.0


def top1_agreement(ref_logits: np.ndarray, test_logits: np.ndarray, mask: np.ndarray) -> float:
    """The fraction of real positions where both logits pick the same token."""
    real = np.asarray(mask).astype(bool)
    same = ref_logits.argmax(-1) == test_logits.argmax(-1)
    return float(same[real].mean()) if real.any() else 1.0


# ---- models with some weights reduced ----------------------------------------------------------
def reduced_groups(config: ModelConfig) -> dict[str, list[str]]:
    """The reduced weights (schema.reduced_weights) by where they sit: "layer 0", "layer 1", ...,
    then "head" (lm_head, or the tied embedding, which is the head too)."""
    groups: dict[str, list[str]] = {f"layer {i}": [] for i in range(config.num_hidden_layers)}
    groups["head"] = []
    for name, _ in reduced_weights(config):
        parts = name.split(".")
        layer = parts[2] if name.startswith("model.layers.") else None
        groups[f"layer {layer}" if layer is not None else "head"].append(name)
    return groups


def with_reduced(model: Model, fmt: str | WeightFormat, names: Collection[str] | None = None) -> Model:
    """A float32 model whose weights ``names`` (default: every reduced weight) hold the values they
    keep in ``fmt``; the others are unchanged. Its float64 reference equals that of
    ``model.as_format(fmt)`` when every reduced weight is named (tests/test_precision.py)."""
    _check_float32(model)
    f = WeightFormat.of(fmt)
    chosen = {name for name, _ in reduced_weights(model.config)} if names is None else set(names)
    unknown = sorted(chosen - set(model.weights))
    if unknown:
        raise UsageError(f"with_reduced: {unknown[0]!r} is not a weight of this model")
    weights = {n: (f.values(n, w) if n in chosen else w) for n, w in model.weights.items()}
    return replace(model, weights=weights)


def _check_float32(model: Model) -> None:
    if model.weight_format != "f32":
        raise UsageError(
            f"the precision cost starts from a float32 model; this one holds {model.weight_format} weights "
            "(what it lost to them is already gone): give the float32 original"
        )


# ---- the result ----------------------------------------------------------------------------------
def point_group(name: str) -> str:
    """A trace point's group: "embed", "layer L" or "head" (the final norm and lm_head)."""
    if name.startswith("model.layers."):
        return f"layer {name.split('.')[2]}"
    return "embed" if name == "model.embed_tokens" else "head"


@dataclass
class PrecisionCost:
    """What ``fmt`` costs a float32 model (``precision_cost``): see the module docstring."""

    fmt: str
    config: ModelConfig
    kv_cache: str = field(default="f32", kw_only=True)  # "bf16": the reduced side's KV cache is bf16
    sqnr: dict[str, float]  # trace point -> SQNR dB over real positions (float points, forward order)
    kl: float  # mean KL(float32 || reduced) of the logits, nats, real positions
    top1: float  # top-1 agreement over real positions
    max_abs_logit: float  # max |logit error| over real positions
    layer_kl: dict[str, float] = field(default_factory=dict)  # group -> KL with only that group reduced
    splice_kl: dict[str, float] = field(default_factory=dict)  # trace point -> its KL contribution

    @property
    def label(self) -> str:
        if self.kv_cache == "f32":
            return f"precision cost (float32 model vs its {self.fmt} weights, both in the float64 reference)"
        weights = "" if self.fmt == "f32" else f"its {self.fmt} weights and "
        return f"precision cost (float32 model vs {weights}a {self.kv_cache} KV cache, both in the float64 reference)"

    def splice_by_group(self) -> dict[str, float]:
        """The splice contributions summed per group ("embed", "layer 0", ..., "head")."""
        out: dict[str, float] = {}
        for name, value in self.splice_kl.items():
            group = point_group(name)
            out[group] = out.get(group, 0.0) + value
        return out

    def summary(self) -> str:
        worst = min(self.sqnr.items(), key=lambda kv: kv[1]) if self.sqnr else ("-", math.inf)
        lines = [
            self.label,
            f"  logits: mean KL {self.kl:.3e} nats, top-1 agreement {self.top1:.2%}, "
            f"max |logit error| {self.max_abs_logit:.3e}",
            f"  lowest SQNR: {worst[0]} {_db(worst[1])}",
        ]
        if self.layer_kl:
            loudest = max(self.layer_kl, key=lambda g: self.layer_kl[g])
            tied = " (head: the tied embedding, both its uses)" if self.config.tie_word_embeddings else ""
            lines.append(
                f"  one group at a time (final KL){tied}: "
                + ", ".join(f"{g} {v:.2e}" for g, v in self.layer_kl.items())
                + (f"; most: {loudest}" if self.layer_kl[loudest] > 0 else "; none loses anything")
            )
        if self.splice_kl:
            by_group = self.splice_by_group()
            top = max(self.splice_kl, key=lambda n: self.splice_kl[n])
            lines.append(
                "  splice (KL each adds, summing to the total): "
                + ", ".join(f"{g} {v:.2e}" for g, v in by_group.items())
                + (
                    f"; most: {top} ({_share(self.splice_kl[top], self.kl)} of the KL)"
                    if self.splice_kl[top] > 0
                    else "; no op loses anything"
                )
            )
        return "\n".join(lines)

    def table(self) -> str:
        """One line per trace point, in forward order: SQNR and (with splicing) the KL it adds and
        its share of the total."""
        rows = [f"{'point':48s} {'SQNR':>10s} {'KL added':>11s} {'share':>7s}"]
        names = list(self.sqnr) + [n for n in self.splice_kl if n not in self.sqnr]
        for name in names:
            sq = _db(self.sqnr[name]) if name in self.sqnr else "-"
            if name in self.splice_kl:
                added, share = f"{self.splice_kl[name]:.3e}", _share(self.splice_kl[name], self.kl)
            else:
                added, share = "-", "-"
            rows.append(f"{name:48s} {sq:>10s} {added:>11s} {share:>7s}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary() + "\n" + self.table()

    def _repr_html_(self) -> str:
        return (
            f"<h4>{html.escape(self.label)}</h4><pre>{html.escape(self.summary())}</pre>"
            f"<details><summary>per trace point</summary><pre>{html.escape(self.table())}</pre></details>"
        )

    def plot(self, figsize: tuple[float, float] = (13, 5)) -> Figure:
        """A bar chart of the KL per layer (one at a time and by splicing) beside a heatmap of the
        per-op SQNR by layer; a matplotlib Figure (no pyplot state)."""
        from . import plots  # noqa: F401  (registers the Figure display hook in Jupyter)

        return precision_figure(self, figsize)


def _db(value: float) -> str:
    return "exact" if value == math.inf else f"{value:.1f} dB"


def _share(value: float, total: float) -> str:
    return f"{value / total:.1%}" if total > 0 else "-"


# ---- running it ----------------------------------------------------------------------------------
def _run(ref: ReferenceModel, teacher: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    logits, points = ref.forward(trace=True, teacher=teacher)
    return logits.numpy(), {k: v.numpy() for k, v in (points or {}).items()}


def _logits_and_trace(
    ref: ReferenceModel, trace: dict[str, np.ndarray] | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``ref``'s float64 run, or the trace the caller already has of it (its logits are lm_head's point)."""
    return (trace["lm_head"], trace) if trace is not None else _run(ref)


def splice_contributions(
    exact: ReferenceModel,
    reduced_trace: dict[str, np.ndarray],
    names: Iterable[str],
    ref_logits: np.ndarray,
    mask: np.ndarray,
) -> dict[str, float]:
    """The KL each trace point adds (module docstring): the exact model run with every point up to
    and including it replaced by the reduced run's value, minus the same up to the point before.

    A point whose value the previous splice already computed exactly as the reduced run did (an op
    with no reduced weight, fed the reduced inputs) would rerun the same forward: it adds 0 and the
    forward is skipped, so the cost is one forward per op that reads a reduced weight."""
    teacher: dict[str, np.ndarray] = {}
    out, before = {}, 0.0
    _, previous = _run(exact)
    for name in names:
        teacher[name] = reduced_trace[name]
        if np.array_equal(previous[name], reduced_trace[name]):
            out[name] = 0.0
            continue
        logits, previous = _run(exact, teacher)
        now = mean_kl(ref_logits, logits, mask)
        out[name], before = now - before, now
    return out


def precision_cost(
    model: Model,
    fmt: str | WeightFormat = "q8",
    *,
    layers_one_at_a_time: bool = True,
    splice: bool = True,
    kv_cache: str = "f32",
    exact_trace: dict[str, np.ndarray] | None = None,
    reduced_trace: dict[str, np.ndarray] | None = None,
) -> PrecisionCost:
    """What storing ``model``'s reduced weights in ``fmt`` costs, on the model file's own inputs, with
    both sides in the float64 reference (module docstring). ``layers_one_at_a_time``: one forward per
    layer (and the head); ``splice``: one per op that reads a reduced weight. ``kv_cache="bf16"``: the
    reduced side's KV cache is bf16 too (fmt "f32": the cache's cost alone). ``exact_trace`` /
    ``reduced_trace``: the float64 traces of ``model`` and of the reduced model when the caller
    already ran them (compare's oracles), so they are not run twice."""
    import torch

    from .reference import ReferenceModel

    _check_float32(model)
    check_kv_cache(kv_cache)
    f = WeightFormat.of(fmt)
    reduced = model.as_format(fmt) if isinstance(fmt, str) else with_reduced(model, f)
    exact = ReferenceModel(model, torch.float64)
    ref_logits, ref_trace = _logits_and_trace(exact, exact_trace)
    red_logits, red_trace = _logits_and_trace(ReferenceModel(reduced, torch.float64, kv_cache), reduced_trace)
    mask = np.asarray(model.attention_mask)
    points = trace_points(model.config, model.batch_size, model.seq_len)
    sqnr = {
        p.name: sqnr_db(
            live_rows(ref_trace[p.name], p.token_axis, mask), live_rows(red_trace[p.name], p.token_axis, mask)
        )
        for p in points
        if p.dtype == "float"
    }
    real = mask.astype(bool)
    cost = PrecisionCost(
        fmt=f.name,
        config=model.config,
        kv_cache=kv_cache,
        sqnr=sqnr,
        kl=mean_kl(ref_logits, red_logits, mask),
        top1=top1_agreement(ref_logits, red_logits, mask),
        max_abs_logit=float(np.abs(ref_logits - red_logits)[real].max()) if real.any() else 0.0,
    )
    if layers_one_at_a_time and not (f.name == "f32" and kv_cache != "f32"):  # only the cache: no group
        for group, names in reduced_groups(model.config).items():
            if names:
                logits, _ = _run(ReferenceModel(with_reduced(model, f, names), torch.float64, kv_cache))
                cost.layer_kl[group] = mean_kl(ref_logits, logits, mask)
    if splice:
        cost.splice_kl = splice_contributions(exact, red_trace, [p.name for p in points], ref_logits, mask)
    return cost


# ---- the figure ------------------------------------------------------------------------------------
def sqnr_grid(cost: PrecisionCost) -> tuple[list[str], list[int], np.ndarray]:
    """(op names within a layer, layers, SQNR dB [ops, layers]) for the heatmap; NaN where absent."""
    ops: list[str] = []
    layers = list(range(cost.config.num_hidden_layers))
    for name in cost.sqnr:
        if name.startswith("model.layers."):
            op = ".".join(name.split(".")[3:]) or "block"
            if op not in ops:
                ops.append(op)
    grid = np.full((len(ops), len(layers)), np.nan)
    for name, value in cost.sqnr.items():
        if name.startswith("model.layers."):
            parts = name.split(".")
            grid[ops.index(".".join(parts[3:]) or "block"), int(parts[2])] = value
    return ops, layers, grid


def precision_figure(cost: PrecisionCost, figsize: tuple[float, float] = (13, 5)) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    bars, heat = fig.subplots(1, 2, width_ratios=[1, 1.3])
    groups = ["embed"] + [f"layer {i}" for i in range(cost.config.num_hidden_layers)] + ["head"]
    x = np.arange(len(groups))
    spliced = cost.splice_by_group()
    width = 0.4
    if cost.layer_kl:
        bars.bar(x - width / 2, [cost.layer_kl.get(g, 0.0) for g in groups], width, label="only this group reduced")
    if spliced:
        bars.bar(x + width / 2, [spliced.get(g, 0.0) for g in groups], width, label="KL added (splice)")
    names = [g.replace("layer ", "L") for g in groups]
    if cost.config.tie_word_embeddings and cost.layer_kl:  # one at a time, "head" is the tied embedding too
        names[-1] = "head\n(+embed: tied)"
    bars.set_xticks(x, names)
    bars.set_ylabel("mean KL of the logits (nats)")
    bars.set_title(f"{cost.fmt}: KL per layer (total {cost.kl:.2e})")
    bars.axhline(0, color="black", linewidth=0.5)
    if cost.layer_kl or spliced:
        bars.legend(fontsize=8)
    ops, layers, grid = sqnr_grid(cost)
    finite = np.where(np.isfinite(grid), grid, np.nan)
    shown = np.ma.masked_invalid(finite)
    image = heat.imshow(shown, aspect="auto", cmap="magma")
    heat.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    heat.set_yticks(range(len(ops)), ops, fontsize=7)
    heat.set_xlabel("layer")
    heat.set_title(f"SQNR per op (dB; blank: exact) — {cost.fmt} vs float32")
    fig.colorbar(image, ax=heat, label="SQNR (dB), lower is worse")
    return fig
