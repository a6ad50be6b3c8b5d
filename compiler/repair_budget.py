"""The repair loop under a size or latency budget: promote, then re-solve the rest around it.

A plan made with ``--budget size=F`` (or ``latency=F``) already spends its
budget, so promoting a layer alone would break it. Here the layers the loop
promotes are *pinned* at their new precision and the knapsack
(``compiler/allocate.py``) is solved again for every other layer within the
same budget: it demotes the layers whose predicted fidelity loss per byte (or
millisecond) freed is smallest. A promotion whose pins alone cannot fit (the
other layers at their cheapest) is skipped. The plan's ``predicted`` figures
follow every change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from dscompile.compiler.allocate import Budget, Choice, allocate, penalise_leaving
from dscompile.compiler.capabilities import FP32
from dscompile.compiler.plan import LayerPlan, QuantPlan

_COLUMN = {"size": ("bytes", 1), "latency": ("latency_ms", 2)}


@dataclass(frozen=True)
class Fixed:
    """Bytes and latency of what is not a layer (the plan's prediction minus its layers' costs)."""

    bytes: float
    latency_ms: float


@dataclass(frozen=True)
class Cap:
    budget: Budget
    fixed: Fixed
    limit: float  # bytes or milliseconds


def fixed_costs(plan: QuantPlan) -> Fixed:
    pred = plan.predicted
    nbytes = sum(_cost(lp, lp.precision, "bytes") for lp in plan.layers)
    ms = sum(_cost(lp, lp.precision, "latency_ms") for lp in plan.layers)
    return Fixed(max(float(pred.get("bytes", nbytes)) - nbytes, 0.0), max(float(pred.get("latency_ms", ms)) - ms, 0.0))


def plan_cap(plan: QuantPlan) -> Cap | None:
    """The hard limit a ``size``/``latency`` budget puts on repair, or None (a ``kl`` budget is a proxy only)."""
    kind, value = next(iter(plan.budget.items()), ("", 0.0))
    if kind not in _COLUMN:
        return None
    total = plan.predicted.get("fp32_bytes" if kind == "size" else "fp32_latency_ms")
    if not total:
        return None
    return Cap(Budget(kind, float(value)), fixed_costs(plan), float(value) * float(total))


def _cost(lp: LayerPlan, p: str, col: str) -> float:
    return float(lp.cost.get(p, {}).get(col, 0.0))


def plan_choices(plan: QuantPlan) -> list[Choice]:
    """Each layer's options as the plan recorded them (measured sensitivity, cost), for the knapsack."""
    out = []
    for lp in plan.layers:
        menu = [p for p in lp.cost if p in lp.sensitivity] or [FP32]
        if lp.precision not in menu:  # a hand edit: keep it possible
            menu.append(lp.precision)
        out.append(Choice(lp.name, {p: (float(lp.sensitivity.get(p, 0.0)), _cost(lp, p, "bytes"),
                                        _cost(lp, p, "latency_ms")) for p in menu}))
    # options the plan recorded as leaving the accelerator rank below every staying one, as in DMPQ
    return penalise_leaving(out, [{p for p in c.options if lp.cost.get(p, {}).get("off_device")}
                                  for c, lp in zip(out, plan.layers, strict=True)])


def _least(choices: list[Choice], pins: dict[str, str], col: int, fixed: float) -> float:
    """The smallest bytes (or ms) reachable with ``pins`` held: every other layer at its cheapest."""
    return fixed + sum(c.options[pins[c.layer]][col] if c.layer in pins else min(o[col] for o in c.options.values())
                       for c in choices)


def promote_within(
    plan: QuantPlan, ranked: Sequence[tuple[str, str]], k: int, cap: Cap, pinned: dict[str, str],
) -> tuple[dict[str, str], list[tuple[str, str]], dict[str, str]] | None:
    """Up to ``k`` promotions from ``ranked`` (best first) that fit with ``pinned``, and every layer's
    precision re-solved around them: (precisions, accepted promotions, new pins), or None if none fits."""
    choices = plan_choices(plan)
    known = {c.layer: c for c in choices}
    col = _COLUMN[cap.budget.kind][1]
    fixed = cap.fixed.bytes if cap.budget.kind == "size" else cap.fixed.latency_ms
    pins, accepted = dict(pinned), []
    for name, q in ranked:
        if len(accepted) >= k:
            break
        if q not in known[name].options:
            continue
        trial = {**pins, name: q}
        if _least(choices, trial, col, fixed) <= cap.limit * (1 + 1e-9):
            pins, accepted = trial, [*accepted, (name, q)]
    if not accepted:
        return None
    alloc = allocate(choices, cap.budget, cap.fixed.bytes, cap.fixed.latency_ms, pins)
    return alloc.precisions, accepted, pins


def repredict(plan: QuantPlan, fixed: Fixed) -> QuantPlan:
    """``plan.predicted`` for the precisions the plan now holds (sizes, latencies, summed sensitivity)."""
    pred = dict(plan.predicted)
    nbytes = fixed.bytes + sum(_cost(lp, lp.precision, "bytes") for lp in plan.layers)
    ms = fixed.latency_ms + sum(_cost(lp, lp.precision, "latency_ms") for lp in plan.layers)
    pred["bytes"], pred["latency_ms"] = int(nbytes), round(ms, 5)
    if pred.get("fp32_bytes"):
        pred["size_ratio"] = round(nbytes / pred["fp32_bytes"], 5)
    if pred.get("fp32_latency_ms"):
        pred["latency_ratio"] = round(ms / pred["fp32_latency_ms"], 5)
    s = sum(float(lp.sensitivity.get(lp.precision, 0.0)) for lp in plan.layers)
    if isinstance(pred.get("sensitivity"), dict):
        pred["sensitivity"] = {**pred["sensitivity"], "value": float(f"{s:.4g}")}
    return replace(plan, predicted=pred)
