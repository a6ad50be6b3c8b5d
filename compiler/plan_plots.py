"""PNG plots of a plan: sensitivity per layer and precision, and the allocation against its budget."""

from __future__ import annotations

import io

from dscompile.compiler.plan import QuantPlan
from dscompile.errors import MissingBackendError

_COLORS = {"fp32": "#4c72b0", "fp16": "#8172b2", "int8": "#55a868", "int8_dynamic": "#64b5cd",
           "int4_weight": "#dd8452", "int16x8": "#937860", "int8_weight": "#da8bc3"}


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingBackendError("matplotlib (for --plots)", "pip install matplotlib") from None
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    fig.clf()
    return buf.getvalue()


def sensitivity_png(plan: QuantPlan) -> bytes:
    """Log-scale sensitivity of each layer at each precision it could take; the chosen one outlined."""
    plt = _plt()
    layers = [lp for lp in plan.layers if len(lp.sensitivity) > 1]
    precisions = sorted({p for lp in layers for p in lp.sensitivity if p != "fp32"})
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(layers) + 2), 4.5))
    width = 0.8 / max(len(precisions), 1)
    floor = min([v for lp in layers for v in lp.sensitivity.values() if v > 0] or [1e-9]) / 10
    for k, p in enumerate(precisions):
        xs = [i + k * width for i, lp in enumerate(layers) if p in lp.sensitivity]
        ys = [max(lp.sensitivity[p], floor) for lp in layers if p in lp.sensitivity]
        edges = ["black" if lp.precision == p else "none" for lp in layers if p in lp.sensitivity]
        ax.bar(xs, ys, width, label=p, color=_COLORS.get(p, "gray"), edgecolor=edges, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(layers))])
    ax.set_xticklabels([lp.name for lp in layers], rotation=90, fontsize=6)
    ax.set_ylabel(f"sensitivity ({plan.sensitivity_metric or 'divergence'}, log)")
    ax.set_title("per-layer sensitivity (outlined: chosen precision)")
    ax.legend(fontsize=7)
    return _png(fig)


def allocation_png(plan: QuantPlan) -> bytes:
    """Chosen precision per layer (bytes at that precision), and predicted totals against the budget."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    names = [lp.name for lp in plan.layers]
    sizes = [lp.cost.get(lp.precision, {}).get("bytes", 0) for lp in plan.layers]
    ax1.bar(range(len(names)), sizes, color=[_COLORS.get(lp.precision, "gray") for lp in plan.layers])
    ax1.set_xticks(range(len(names)))
    ax1.set_xticklabels(names, rotation=90, fontsize=6)
    ax1.set_ylabel("weight bytes at the chosen precision")
    handles = [plt.Rectangle((0, 0), 1, 1, color=_COLORS.get(p, "gray")) for p in plan.precision_counts()]
    ax1.legend(handles, list(plan.precision_counts()), fontsize=7)
    ax1.set_title("allocation")
    pred = plan.predicted
    kind, value = next(iter(plan.budget.items())) if plan.budget else ("", None)
    bars = {"size": pred.get("size_ratio") or 0, "latency": pred.get("latency_ratio") or 0}
    ax2.bar(list(bars), list(bars.values()), color=["#55a868", "#4c72b0"])
    if kind in bars and value is not None:
        ax2.axhline(value, color="red", linestyle="--", label=f"budget {kind}={value}")
        ax2.legend(fontsize=7)
    ax2.set_ylim(0, max(1.05, *bars.values()))
    ax2.set_ylabel("predicted / FP32")
    title = f"sensitivity {pred.get('sensitivity', {}).get('value', '')}"
    if kind == "kl":
        title += f" (budget {value})"
    ax2.set_title(title, fontsize=9)
    return _png(fig)
