"""Exact precision allocation: a multiple-choice knapsack solved as an integer program.

One binary x[l, p] per layer l and precision p on its menu, exactly one per
layer. Three budgets:

- ``kl=B``: minimise predicted cost subject to sum(sensitivity) <= B, where cost
  is latency and bytes, each as a fraction of the all-FP32 total, summed;
- ``size=F``: minimise sum(sensitivity) subject to bytes <= F x FP32 bytes;
- ``latency=F``: minimise sum(sensitivity) subject to latency <= F x FP32 latency.

Bytes and latency of what is not a layer (embeddings, norms) are a constant on
both sides. ``scipy.optimize.milp`` (HiGHS) solves it exactly; a budget it
cannot meet is an InputError naming the closest reachable value and the
layers that bind.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dscompile.compiler.capabilities import FP32
from dscompile.errors import InputError

BUDGET_KINDS = ("kl", "size", "latency")
# Ties (equal sensitivity) are broken toward the cheaper choice with this weight.
_TIE = 1e-6


@dataclass(frozen=True)
class Budget:
    kind: str  # kl | size | latency
    value: float

    def to_json(self) -> dict[str, float]:
        return {self.kind: self.value}


def parse_budget(text: str) -> Budget:
    """``kl=0.01``, ``size=0.25``, ``latency=0.5``; a fraction may be written ``size=1/6``."""
    kind, sep, val = text.partition("=")
    kind = kind.strip().lower()
    num, slash, den = val.partition("/")
    try:
        value = float(num) / float(den) if slash else float(val)
    except (ValueError, ZeroDivisionError):
        value = float("nan")
    if not sep or kind not in BUDGET_KINDS or not np.isfinite(value) or value <= 0:
        raise InputError(f"--budget {text!r}: expected kl=<divergence>, size=<fraction> or latency=<fraction> (> 0; a/b allowed)")
    return Budget(kind, value)


@dataclass(frozen=True)
class Choice:
    """One layer's options: precision -> (sensitivity, bytes, latency_ms)."""

    layer: str
    options: dict[str, tuple[float, float, float]]


@dataclass(frozen=True)
class Allocation:
    precisions: dict[str, str]
    sensitivity: float
    bytes: float
    latency_ms: float
    fp32_bytes: float
    fp32_latency_ms: float

    def predicted(self) -> dict[str, float]:
        return {
            "sensitivity": float(f"{self.sensitivity:.4g}"),
            "bytes": int(self.bytes),
            "size_ratio": round(self.bytes / self.fp32_bytes, 5) if self.fp32_bytes else None,
            "latency_ms": round(self.latency_ms, 5),
            "latency_ratio": round(self.latency_ms / self.fp32_latency_ms, 5) if self.fp32_latency_ms else None,
        }


def totals(choices: list[Choice], pick: dict[str, str], fixed_bytes: float, fixed_ms: float) -> tuple[float, float, float]:
    s = sum(c.options[pick[c.layer]][0] for c in choices)
    b = fixed_bytes + sum(c.options[pick[c.layer]][1] for c in choices)
    t = fixed_ms + sum(c.options[pick[c.layer]][2] for c in choices)
    return s, b, t


def allocate(choices: list[Choice], budget: Budget, fixed_bytes: float = 0.0, fixed_ms: float = 0.0,
             pinned: dict[str, str] | None = None) -> Allocation:
    """The exact allocation within ``budget``; ``pinned`` layers keep the precision given (the repair
    loop pins what it promoted, so the others are re-solved around it)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if not choices:
        return Allocation({}, 0.0, fixed_bytes, fixed_ms, fixed_bytes, fixed_ms)
    fp32 = {c.layer: FP32 if FP32 in c.options else next(iter(c.options)) for c in choices}
    _, fp32_bytes, fp32_ms = totals(choices, fp32, fixed_bytes, fixed_ms)
    var = [(c.layer, p) for c in choices for p in c.options]
    opts = [c.options[p] for c in choices for p in c.options]
    sens, nbytes, ms = (np.array([o[i] for o in opts], dtype=float) for i in range(3))
    norm_cost = nbytes / max(fp32_bytes, 1e-12) + ms / max(fp32_ms, 1e-12)
    one_each = np.zeros((len(choices), len(var)))
    col = 0
    for i, c in enumerate(choices):
        one_each[i, col : col + len(c.options)] = 1
        col += len(c.options)
    cons = [LinearConstraint(one_each, 1, 1)]
    if budget.kind == "kl":
        objective = norm_cost + _TIE * sens
        cons.append(LinearConstraint(sens[None, :], -np.inf, budget.value))
    else:
        row, total_fp32, fixed = (nbytes, fp32_bytes, fixed_bytes) if budget.kind == "size" else (ms, fp32_ms, fixed_ms)
        objective = sens + _TIE * norm_cost
        cons.append(LinearConstraint(row[None, :], -np.inf, budget.value * total_fp32 - fixed))
    lower = np.array([1.0 if (pinned or {}).get(layer) == p else 0.0 for layer, p in var])
    res = milp(objective, constraints=cons, integrality=np.ones(len(var)), bounds=Bounds(lower, 1))
    if res.status != 0 or res.x is None:
        raise InputError(_infeasible(choices, budget, fixed_bytes, fixed_ms, fp32_bytes, fp32_ms))
    pick = {layer: p for (layer, p), x in zip(var, res.x, strict=True) if x > 0.5}
    s, b, t = totals(choices, pick, fixed_bytes, fixed_ms)
    return Allocation(pick, s, b, t, fp32_bytes, fp32_ms)


def _infeasible(choices, budget, fixed_bytes, fixed_ms, fp32_bytes, fp32_ms) -> str:
    """The closest reachable value and the layers that bind (their best option is still the largest)."""
    if budget.kind == "kl":
        best = sum(min(o[0] for o in c.options.values()) for c in choices)
        worst = sorted(choices, key=lambda c: -min(o[0] for o in c.options.values()))[:3]
        names = ", ".join(f"{c.layer} ({min(o[0] for o in c.options.values()):.3g})" for c in worst)
        return (f"budget kl={budget.value:g} cannot be met: the least reachable summed sensitivity is {best:.4g}; "
                f"binding layers: {names}")
    k = 1 if budget.kind == "size" else 2
    fixed, total = (fixed_bytes, fp32_bytes) if budget.kind == "size" else (fixed_ms, fp32_ms)
    least = fixed + sum(min(o[k] for o in c.options.values()) for c in choices)
    binding = sorted(choices, key=lambda c: -min(o[k] for o in c.options.values()))[:3]
    names = ", ".join(c.layer for c in binding)
    what = "non-layer tensors" if fixed > 0.5 * least else "layers"
    return (f"budget {budget.kind}={budget.value:g} cannot be met: the smallest reachable is "
            f"{least / total if total else 0:.4f} of FP32 ({what} bind; largest at their cheapest: {names})")


OFF_DEVICE_MARGIN = 1e-6  # a layer off the accelerator outweighs every sensitivity difference by this


def penalise_leaving(choices: list[Choice], leaving: list[set[str]]) -> list[Choice]:
    """``choices`` with each option in ``leaving`` (per choice: precisions that leave the accelerator)
    charged more sensitivity than any two allocations differ by (compiler/dmpq.py ``prefer_on_device``)."""
    if not any(leaving):
        return choices
    span = sum(max(o[0] for o in c.options.values()) for c in choices) + OFF_DEVICE_MARGIN
    return [Choice(c.layer, {p: (o[0] + span if p in leave else o[0], o[1], o[2]) for p, o in c.options.items()})
            for c, leave in zip(choices, leaving, strict=True)]
