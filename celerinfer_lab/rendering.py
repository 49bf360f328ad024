"""A Report as text, as a pandas table and as HTML (Report.to_text, .table, _repr_html_ call these).

Views only: they read a Report and compute nothing the verdicts depend on. report.py imports this
module, so the Report type is imported here for the annotations alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # report.py imports this module: the type, not the module, is needed here
    import pandas as pd

    from .precision import PrecisionCost
    from .report import Report

# The row colour of each label in the HTML table
LABEL_STYLES = {
    "ok": "",
    "culprit": "background:#f8d0d0;font-weight:bold",
    "own error": "background:#f8d0d0",
    "propagated": "background:#fbeecb",
    "amplified": "background:#f6dcb4",
}


def table(report: Report) -> pd.DataFrame:
    """A pandas DataFrame, one row per trace point in forward order."""
    import pandas as pd

    rows = [
        {
            "trace point": p.name,
            "shape": str(list(p.shape)),
            "max_abs": p.max_abs,
            "rel_l2": p.rel_l2,
            "sqnr_db": p.sqnr_db,
            "cosine": p.cosine,
            "n_bad": p.n_bad,
            "floor": p.floor,
            "tol": p.tol,
            "own_rel_l2": p.own_rel_l2,
            "own_tol": p.own_tol,
            "status": p.label,
            "note": p.note,
        }
        for p in report.points
    ]
    return pd.DataFrame(rows).set_index("trace point")


def summary(report: Report) -> str:
    """The logits' agreement, then the verdict: all agree, or the first divergent point and the culprit."""
    lg = report.logits
    lines = [
        f"logits: top-1 agreement {lg.top1_agreement:.4f}, KL per token mean {lg.kl_mean:.3e} "
        f"max {lg.kl_max:.3e} (float32 reference max {lg.floor_kl_max:.3e})"
    ]
    if report.meta.get("weights"):  # a bf16/q8 kernel set: judged against float64 on the same weights
        lines.insert(0, f"kernel correctness ({report.meta['weights']})")
    if report.meta.get("kv_cache") == "bf16":  # the cache points judged as rounding points (kvcache.py)
        lines.insert(
            0,
            "KV cache: bf16 (keys and values rounded to nearest even as they join the cache; the oracle "
            "adopts the C++'s admissible roundings)",
        )
    cost = report.meta.get("precision_cost")
    if report.agrees:
        overrides = len(report.tolerances.overrides)
        lines.append(
            f"all {len(report.points)} trace points agree (within {report.tolerances.factor:g}x the float32 "
            f"reference's own error against float64"
            + (f"; {overrides} tolerance override{'s' if overrides > 1 else ''}" if overrides else "")
            + ")"
        )
        return "\n".join(lines + _cost_lines(cost))
    first = report.first_divergent
    if first is not None:
        lines.append(f"first divergent (accumulated): {first.name} rel_l2 {first.rel_l2:.3e} > tol {first.tol:.3e}")
    c = report.culprit
    if c is not None:
        lines.append(f"culprit (own error): {c.name} rel_l2 {c.own_rel_l2:.3e} > tol {c.own_tol:.3e}")
        lines.append(f"diagnosis: {report.diagnosis or 'no known pattern'}")
    return "\n".join(lines + _cost_lines(cost))


def _cost_lines(cost: PrecisionCost | None) -> list[str]:
    """The other question, kept apart: what the weight format costs against the float32 model."""
    return ["", cost.summary()] if cost is not None else []


def text(report: Report) -> str:
    """One fixed-width line per trace point, then the summary."""
    head = (
        f"{'trace point':48s} {'shape':>16s} {'max_abs':>9s} {'rel_l2':>9s} {'sqnr_db':>7s} {'cosine':>10s} "
        f"{'n_bad':>6s} {'tol':>8s} {'own_rel':>9s}  status"
    )
    rows = [head]
    for p in report.points:
        rows.append(
            f"{p.name:48s} {str(list(p.shape)):>16s} {p.max_abs:9.2e} {p.rel_l2:9.2e} {p.sqnr_db:7.1f} "
            f"{p.cosine:10.7f} {p.n_bad:6d} {p.tol:8.1e} {p.own_rel_l2:9.2e}  {p.label}"
            f"{'  (' + p.note + ')' if p.note else ''}"
        )
    return "\n".join(rows) + "\n" + summary(report)


def html(report: Report) -> str:
    """The table with one colour per label and the summary above it (Jupyter's display)."""
    formats = {c: "{:.2e}" for c in ("max_abs", "rel_l2", "floor", "tol", "own_rel_l2", "own_tol")}
    formats.update(sqnr_db="{:.1f}", cosine="{:.7f}")
    styled = (
        table(report).style.format(formats).apply(lambda row: [LABEL_STYLES.get(row["status"], "")] * len(row), axis=1)
    )
    lines = "<br>".join(summary(report).splitlines())
    return f"<div><p><b>{lines}</b></p>{styled.to_html()}</div>"
