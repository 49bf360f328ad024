"""matplotlib figures from a comparison Report. Each function returns a Figure (no pyplot state),
so notebooks display it and tests inspect its artists."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure

from .errors import UsageError
from .metrics import MASKED_BELOW
from .trace import trace_points

if TYPE_CHECKING:  # Report.plot imports this module: the type, not the module, is needed here
    from .report import Report


def show_figures_in_ipython() -> None:
    """Figures made without pyplot have no display hook of their own: in IPython/Jupyter, register
    the PNG formatter for Figure objects (what `%matplotlib inline` does)."""
    try:
        from IPython import get_ipython
        from IPython.core.pylabtools import select_figure_formats
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        select_figure_formats(shell, {"png"})


show_figures_in_ipython()  # this module's own Figures display in Jupyter (bench.plot_sweep calls it too)


def _short(name: str) -> str:
    return name.replace("model.layers.", "L").replace("self_attn.", "").replace("model.", "")


def _clip(values: npt.ArrayLike, low: float = 1e-12, high: float = 1e3) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return np.clip(np.where(np.isfinite(v), v, high), low, high)


_MARKERS = "osD^v<>pPXh*"


def depth_layout(names: list[str]) -> tuple[np.ndarray, list[str], list[tuple[float, str]]]:
    """Where each trace point goes on the depth plot: x (layer index, the ops of a layer spread in
    forward order across [layer, layer + 0.8]; the embedding at -1, the final norm and lm_head after
    the last layer), its op kind ("q_proj", "scores", "layer output", ...) and the group ticks
    [(x, "embed"), (0, "0"), (1, "1"), ..., (L, "out")]."""
    layer_of: list[int | None] = []
    kinds: list[str] = []
    for name in names:
        parts = name.split(".")
        if name.startswith("model.layers.") and len(parts) >= 3 and parts[2].isdigit():
            layer_of.append(int(parts[2]))
            kinds.append("layer output" if len(parts) == 3 else parts[-1])
        else:
            layer_of.append(None)
            kinds.append(parts[-1])
    layers = sorted({layer for layer in layer_of if layer is not None})
    last = (layers[-1] + 1) if layers else 0
    first_layer = next((i for i, layer in enumerate(layer_of) if layer is not None), len(names))
    groups: dict[int | str, list[int]] = {}  # a layer, or "embed" / "out"
    for i, layer in enumerate(layer_of):
        key = layer if layer is not None else ("embed" if i < first_layer else "out")
        groups.setdefault(key, []).append(i)
    x = np.zeros(len(names))
    ticks = []
    for key, members in groups.items():
        base = -1.0 if key == "embed" else float(last) if key == "out" else float(key)
        for k, i in enumerate(members):
            x[i] = base + (0.8 * k / max(1, len(members) - 1) if len(members) > 1 else 0.4)
        ticks.append((base + 0.4, str(key)))
    return x, kinds, ticks


def error_along_depth(report: Report, figsize: tuple[float, float] = (12, 5)) -> Figure:
    """Relative L2 error at every trace point (log scale) against the layer it belongs to: one marker
    and colour per op kind (legend), the ops of a layer in forward order inside its band, accumulated
    error (filled markers on a grey line) and isolated error (black crosses), the tolerance band,
    the culprit marked."""
    import matplotlib

    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    names = [p.name for p in report.points]
    x, kinds, ticks = depth_layout(names)
    tol = np.array([p.tol for p in report.points])
    ax.fill_between(
        x, 1e-12, _clip(tol), color="tab:green", alpha=0.12, step="mid", label="tolerance (10x float32 floor)"
    )
    ax.plot(
        x,
        _clip([p.floor for p in report.points]),
        color="tab:green",
        lw=1,
        ls=":",
        label="float32 reference vs float64",
    )
    acc = _clip([p.rel_l2 for p in report.points])
    own = _clip([p.own_rel_l2 for p in report.points])
    ax.plot(x, acc, color="grey", lw=0.8, alpha=0.7, label=f"{report.subject} accumulated (markers: op kind)")
    ax.plot(
        x, own, ls="none", marker="x", ms=4, color="black", alpha=0.6, label=f"{report.subject} isolated (own error)"
    )
    colours = matplotlib.colormaps["tab20"]
    kind_order = list(dict.fromkeys(kinds))
    kind_handles = []
    for j, kind in enumerate(kind_order):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        kind_handles.append(
            ax.scatter(
                x[idx],
                acc[idx],
                marker=_MARKERS[j % len(_MARKERS)],
                s=30,
                color=colours(j % 20),
                edgecolors="black",
                linewidths=0.3,
                zorder=3,
                label=kind,
            )
        )
    for k, (centre, _label) in enumerate(ticks):  # layer bands
        if k % 2:
            ax.axvspan(centre - 0.5, centre + 0.5, color="grey", alpha=0.07, lw=0)
    culprit = report.culprit
    if culprit is not None:
        cx = float(x[report.points.index(culprit)])
        ax.axvline(cx, color="tab:red", lw=1.5)
        ax.annotate(
            f"culprit: {_short(culprit.name)}",
            (cx, _clip([culprit.own_rel_l2])[0]),
            xytext=(6, 6),
            textcoords="offset points",
            color="tab:red",
            fontsize=9,
        )
    ax.set_yscale("log")
    ax.set_ylim(1e-10, 1e2)
    ax.set_xticks([c for c, _ in ticks], [label for _, label in ticks], fontsize=9)
    ax.set_xlim(min(x) - 0.6, max(x) + 0.6)
    ax.set_xlabel(
        "layer (each layer's ops in forward order inside its band; embed before, final norm and lm_head after)"
    )
    ax.set_ylabel("relative L2 error vs float64")
    ax.set_title("error along depth" + (f" — culprit {culprit.name}" if culprit else " — all points agree"))
    lines = [h for h in ax.get_legend_handles_labels()[0] if h not in kind_handles]
    first = ax.legend(handles=lines, fontsize=8, loc="upper left")
    ax.add_artist(first)
    fig.legend(handles=kind_handles, title="op kind", fontsize=8, loc="outside right center", ncols=1)
    return fig


def attention_heatmap(
    report: Report,
    point: str | None = None,
    batch: int = 0,
    isolated: bool = True,
    figsize: tuple[float, float] = (8, 3.5),
) -> Figure:
    """Error per (position, head) of an attention trace point (default: the culprit if it is one,
    else layer 0's scores): mean |y - x| over the rest of each head's values."""
    config = report.meta["config"]
    B, S = report.attention_mask.shape
    points = {p.name: p for p in trace_points(config, B, S, kv_cache=report.meta.get("kv_cache", "f32"))}
    if point is None:
        c = report.culprit
        point = c.name if c is not None and ".self_attn." in c.name else "model.layers.0.self_attn.scores"
    if point not in points or ".self_attn." not in point:
        raise ValueError(f"{point!r} is not an attention trace point")
    x = report.runs[_oracle_for(report, isolated)][point].astype(np.float64)[batch]
    y = report.runs["cpp_own" if isolated else "cpp"][point].astype(np.float64)[batch]
    masked = (x <= MASKED_BELOW) | ~np.isfinite(x)
    with np.errstate(invalid="ignore"):
        err = np.where(masked & ((y <= MASKED_BELOW) | ~np.isfinite(y)), 0.0, np.abs(y - x))
    err = np.where(np.isfinite(err), err, np.nan)
    if points[point].token_axis == 2:  # [nh, S, S]: mean over keys -> [nh, S]
        grid = np.nanmean(err, axis=-1)
    else:
        per_token = int(np.prod(points[point].shape[2:]))
        heads = config.num_attention_heads if per_token == config.q_dim else config.num_key_value_heads
        grid = np.nanmean(err.reshape(S, heads, -1), axis=-1).T  # [heads, S]
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.log10(grid + 1e-12), aspect="auto", cmap="magma", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="log10 mean |error|")
    pad = np.where(report.attention_mask[batch] == 0)[0]
    for s in pad:
        ax.axvline(s, color="cyan", lw=0.6, alpha=0.6)
    ax.set_xlabel("position" + (" (cyan: padding)" if len(pad) else ""))
    ax.set_ylabel("head")
    ax.set_title(
        f"{'isolated' if isolated else 'accumulated'} error per (position, head): {_short(point)}, batch {batch}"
    )
    return fig


def _oracle_for(report: Report, isolated: bool) -> str:
    """The oracle a run is measured against (report.accumulated_oracle: a bf16 KV cache's accumulated
    run against the oracle continued from the C++'s admissible roundings)."""
    return "oracle_acc" if not isolated and "oracle_acc" in report.runs else "oracle"


DENSITY_ABOVE = 10_000  # scatter plots with more points become hexbin density plots


def scatter_and_histogram(
    report: Report, point: str | None = None, isolated: bool = False, figsize: tuple[float, float] = (10, 4)
) -> Figure:
    """Reference vs C++ values of one trace point (default: the culprit, else lm_head), and a
    histogram of their differences."""
    if point is None:
        point = report.culprit.name if report.culprit is not None else "lm_head"
    report.point(point)  # a clear KeyError for an unknown name
    x = report.runs[_oracle_for(report, isolated)][point].astype(np.float64).ravel()
    y = report.runs["cpp_own" if isolated else "cpp"][point].astype(np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y) & (x > MASKED_BELOW) & (y > MASKED_BELOW)
    x, y = x[ok], y[ok]
    fig = Figure(figsize=figsize, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    if x.size > DENSITY_ABOVE:  # a scatter of this many points is one blob: show the density
        hexes = ax1.hexbin(x, y, gridsize=80, bins="log", mincnt=1, cmap="viridis")
        fig.colorbar(hexes, ax=ax1, label="points per cell (log)")
    else:
        ax1.scatter(x, y, s=4, alpha=0.5)
    if x.size:
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax1.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    ax1.set_xlabel("reference (float64)")
    ax1.set_ylabel(report.subject)
    ax1.set_title(f"{_short(point)}: {x.size:,} values" + (" (density)" if x.size > DENSITY_ABOVE else ""))
    diff = y - x
    ax2.hist(diff, bins=60, color="tab:purple")
    ax2.set_xlabel(f"{report.subject} − reference")
    ax2.set_ylabel("count")
    ax2.set_title(f"differences: max |d| {np.abs(diff).max() if diff.size else 0:.2e}")
    return fig


def logits_agreement(report: Report, figsize: tuple[float, float] = (10, 3.5)) -> Figure:
    """Per token: KL(reference || C++) of the next-token distributions (log scale) and whether
    the top-1 token agrees."""
    lg = report.logits
    B, S = lg.kl_per_token.shape
    x = report.runs[_oracle_for(report, False)]["lm_head"]
    y = report.runs["cpp"]["lm_head"]
    agree = x.argmax(-1) == y.argmax(-1)
    real = report.attention_mask.astype(bool)
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    idx = np.arange(B * S)
    kl = lg.kl_per_token.reshape(-1)
    shown = real.reshape(-1)
    ax.bar(idx[shown], _clip(kl[shown], 1e-16, 1e3), color="tab:blue", label="KL per token")
    bad = (~agree & real).reshape(-1)
    ax.scatter(idx[bad], np.full(bad.sum(), 1e2), marker="v", color="tab:red", label="top-1 differs")
    for b in range(1, B):
        ax.axvline(b * S - 0.5, color="grey", lw=0.5)
    ax.set_yscale("log")
    ax.set_ylim(1e-16, 1e3)
    ax.set_xlabel("token (batch-major; gaps are padding)")
    ax.set_ylabel("KL (nats)")
    ax.set_title(
        f"logits: top-1 agreement {lg.top1_agreement:.3f}, KL mean {lg.kl_mean:.2e}"
        + ("" if math.isfinite(lg.kl_max) else " (non-finite)")
    )
    ax.legend(fontsize=8)
    return fig


def plot_history(table: Any, figures: list[str] | None = None, width: float = 9) -> Figure:
    """The benchmark history (``BenchStore.table()``: one row per saved result and figure), one panel
    per figure: the median of each saved result in order, its interquartile range as a band and its
    min–max as thin bars, the x axis labelled with the result's id, commit and date. Results of
    different machines or workloads share a panel only if the table mixes them: filter it first."""
    if table is None or len(table) == 0:
        raise UsageError("plot_history: the table has no saved results (save some with `bench --save`)")
    missing = {"id", "figure", "median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "commit", "timestamp"} - set(
        table.columns
    )
    if missing:
        raise UsageError(f"plot_history: the table lacks columns {sorted(missing)} (use BenchStore.table())")
    names = list(dict.fromkeys(table["figure"])) if figures is None else figures
    unknown = [name for name in names if name not in set(table["figure"])]
    if unknown:
        raise UsageError(f"plot_history: no figure {unknown} in the table; it has {sorted(set(table['figure']))}")
    fig = Figure(figsize=(width, 2.4 * len(names) + 0.6), layout="constrained")
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, names):
        rows = table[table["figure"] == name].sort_values("id")
        x = np.arange(len(rows))
        median = rows["median_ms"].to_numpy(float)
        (line,) = ax.plot(x, median, marker="o", label="median")
        ax.fill_between(
            x,
            rows["q1_ms"].to_numpy(float),
            rows["q3_ms"].to_numpy(float),
            alpha=0.25,
            color=line.get_color(),
            label="IQR",
        )
        ax.vlines(
            x,
            rows["min_ms"].to_numpy(float),
            rows["max_ms"].to_numpy(float),
            color=line.get_color(),
            lw=0.8,
            alpha=0.5,
            label="min–max",
        )
        ax.set_xticks(
            x,
            [f"#{i}\n{c}\n{str(t)[:16]}" for i, c, t in zip(rows["id"], rows["commit"], rows["timestamp"])],
            fontsize=7,
        )
        ax.set_yscale("log")
        # the min–max bars can reach 100x the median (a preempted run): the axis follows the IQR
        ax.set_ylim(rows["min_ms"].min() * 0.8, rows["q3_ms"].max() * 2)
        ax.set_ylabel("ms")
        ax.set_title(f"{name}: median per saved result, IQR band, min–max bars", fontsize=9)
    axes[0].legend(fontsize=7, loc="upper left")
    return fig


def plot(report: Report, kind: str = "depth", **kwargs: Any) -> Figure:
    """The figure of one ``kind`` (Report.plot): 'depth', 'heatmap', 'scatter' or 'logits'."""
    makers: dict[str, Callable[..., Figure]] = {
        "depth": error_along_depth,
        "heatmap": attention_heatmap,
        "scatter": scatter_and_histogram,
        "logits": logits_agreement,
    }
    if kind not in makers:
        raise ValueError(f"unknown plot kind {kind!r}; choose from {sorted(makers)}")
    return makers[kind](report, **kwargs)


def plot_roofline(
    points: list[tuple[str, float, float | None, float | None]],
    peak_gflops: float,
    bandwidths: dict[str, float],
    title: str = "roofline",
    figsize: tuple[float, float] = (8, 5.5),
) -> Figure:
    """The roofline (log-log): arithmetic intensity (FLOP/byte) against achieved GFLOP/s, one point
    per op and side — ``points`` are (op, intensity, C++ GFLOP/s, PyTorch GFLOP/s or None) —, under
    the roofs min(peak, intensity × bandwidth) of the machine: ``bandwidths`` by name (GB/s), the
    first the one that bounds these ops (solid), the others dashed (profile.Profile.plot gives them)."""
    if not points:
        raise ValueError("no op with arithmetic to plot")
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    if not bandwidths:
        raise ValueError("no bandwidth roof given")
    ai = np.array([p[1] for p in points], dtype=np.float64)
    lowest = min(bandwidths.values())
    lo, hi = max(ai.min() / 4, 1e-3), max(ai.max() * 4, 4 * peak_gflops / lowest)
    x = np.geomspace(lo, hi, 200)
    for i, (label, gbs) in enumerate(bandwidths.items()):
        ax.plot(
            x, np.minimum(peak_gflops, x * gbs), color="black", lw=1.5 if i == 0 else 0.8, ls="-" if i == 0 else "--"
        )
        ax.annotate(
            f"{label} {gbs:.0f} GB/s (ridge {peak_gflops / gbs:.1f} FLOP/B)",
            (lo * 1.2, lo * 1.2 * gbs),
            va="bottom",
            fontsize=8,
        )
    ax.annotate(f"FMA peak {peak_gflops:.0f} GFLOP/s", (hi, peak_gflops), ha="right", va="bottom", fontsize=8)
    for side, column, color, marker in (("C++", 2, "tab:blue", "o"), ("PyTorch", 3, "tab:orange", "s")):
        shown: list[tuple[str, float, float]] = []
        for p in points:
            value = p[2] if column == 2 else p[3]
            if value:
                shown.append((p[0], p[1], value))
        if not shown:
            continue
        ax.scatter([s[1] for s in shown], [s[2] for s in shown], color=color, marker=marker, label=side, zorder=3)
        if column == 2:
            for name, xi, yi in shown:
                ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
    for name, xi, cpp, ref in points:  # each op's two points joined
        if cpp and ref:
            ax.plot([xi, xi], [cpp, ref], color="grey", lw=0.6, zorder=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_campaign_margins(rows: Any, width: float = 8) -> Figure:
    """A campaign's tolerance margins (campaign.py rows, a DataFrame): per kernel set, the histogram of
    each model's worst error / max(floor, MIN_FLOOR); the debugger calls a point divergent above FACTOR."""
    from .metrics import FACTOR

    plain = rows[(rows["fault"] == "") & np.isfinite(rows["worst_ratio"]) & (rows["worst_ratio"] > 0)]
    if not len(plain):
        raise UsageError("no rows with a measured margin to plot (every row is a fault or an error)")
    fig = Figure(figsize=(width, 3.6))
    ax = fig.add_subplot()
    top = max(float(plain["worst_ratio"].max()), FACTOR) * 1.5
    bins = [float(b) for b in np.geomspace(max(float(plain["worst_ratio"].min()), 1e-3) / 1.5, top, 40)]
    for name, group in plain.groupby("kernels"):
        ax.hist(group["worst_ratio"], bins=bins, histtype="step", linewidth=1.5, label=f"{name} ({len(group)})")
    ax.axvline(FACTOR, color="crimson", linestyle="--", label=f"divergent above {FACTOR:g}")
    ax.set_xscale("log")
    ax.set_xlabel("worst error / max(floor, MIN_FLOOR) per model")
    ax.set_ylabel("models")
    ax.set_title("Tolerance margin over the campaign")
    ax.legend(fontsize=8)
    return fig
