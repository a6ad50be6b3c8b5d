"""Repair loop: build, measure on held-out data, promote layers until the fidelity floor holds.

Each round promotes the layers with the best predicted fidelity gain per unit
of cost (gain: the drop in the layer's sensitivity from its current precision
to the next safer one on its menu; cost: the added latency and bytes, as
fractions of FP32). The number promoted doubles each round, so a badly missed
floor converges in a few rounds. Every round is recorded in the plan.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from dscompile.compiler.capabilities import FP32
from dscompile.compiler.plan import LayerPlan, QuantPlan
from dscompile.compiler.verify import Fidelity
from dscompile.errors import InputError, VerificationError

log = logging.getLogger("dscompile")
METRICS = ("cosine", "top1", "auto")
DEFAULT_ROUNDS = 6


@dataclass(frozen=True)
class FidelityGoal:
    metric: str  # cosine | top1 | auto (top1 for score outputs, cosine otherwise)
    value: float

    def measure(self, f: Fidelity) -> float:
        if self.metric in ("top1", "auto"):
            return f.top1_agreement if f.top1_agreement is not None else f.cosine
        return f.cosine

    def met(self, f: Fidelity) -> bool:
        return self.measure(f) >= self.value

    def to_json(self) -> dict[str, float]:
        return {self.metric: self.value}


def parse_goal(text: str) -> FidelityGoal:
    """``cosine=0.995``, ``top1=0.99`` or ``auto=0.99``."""
    metric, sep, val = text.partition("=")
    metric = metric.strip().lower().replace("top1_agreement", "top1").replace("top-1", "top1")
    try:
        value = float(val)
    except ValueError:
        value = float("nan")
    if not sep or metric not in METRICS or not (0 < value <= 1):
        raise InputError(f"--min-fidelity {text!r}: expected cosine=<0..1>, top1=<0..1> or auto=<0..1>")
    return FidelityGoal(metric, value)


def _norm_cost(lp: LayerPlan, p: str, fp32_bytes: float, fp32_ms: float) -> float:
    c = lp.cost.get(p, {})
    return c.get("bytes", 0) / max(fp32_bytes, 1e-12) + c.get("latency_ms", 0.0) / max(fp32_ms, 1e-12)


def _promotion(lp: LayerPlan, fp32_bytes: float, fp32_ms: float) -> tuple[float, str] | None:
    """(gain per cost, next precision) for a layer, or None if it is already as safe as it gets."""
    cur = lp.sensitivity.get(lp.precision, 0.0)
    safer = [(q, s) for q, s in lp.sensitivity.items() if s < cur and q in lp.cost]
    if lp.precision != FP32 and not safer and FP32 in lp.cost:
        safer = [(FP32, 0.0)]
    if not safer:
        return None
    here = _norm_cost(lp, lp.precision, fp32_bytes, fp32_ms)
    q, s = min(safer, key=lambda qs: (_norm_cost(lp, qs[0], fp32_bytes, fp32_ms), qs[1]))
    extra = max(_norm_cost(lp, q, fp32_bytes, fp32_ms) - here, 1e-9)
    return (cur - s) / extra, q


def repair(
    plan: QuantPlan, evaluate: Callable[[QuantPlan], Fidelity], goal: FidelityGoal | None,
    max_rounds: int = DEFAULT_ROUNDS,
) -> tuple[QuantPlan, Fidelity]:
    """Promote layers until ``evaluate(plan)`` meets ``goal``; the final plan carries every round."""
    fid = evaluate(plan)
    rounds = [_round(0, fid, goal, [])]
    step = 1
    while goal is not None and not goal.met(fid):
        if len(rounds) > max_rounds:
            raise VerificationError(
                f"--min-fidelity {goal.metric}={goal.value}: reached {goal.measure(fid):.5f} after {max_rounds} "
                f"repair rounds (raise the budget, lower the floor, or pin layers to fp32 in a plan)"
            )
        fp32_bytes = plan.predicted.get("fp32_bytes", 1) or 1
        fp32_ms = plan.predicted.get("fp32_latency_ms", 1) or 1
        ranked = []
        for lp in plan.layers:
            promo = _promotion(lp, fp32_bytes, fp32_ms)
            if promo is not None:
                ranked.append((promo[0], lp.name, promo[1]))
        ranked.sort(reverse=True)
        if not ranked:
            raise VerificationError(
                f"--min-fidelity {goal.metric}={goal.value}: {goal.measure(fid):.5f} with every layer at its safest precision"
            )
        quantised = sum(lp.precision != FP32 for lp in plan.layers)
        k = min(len(ranked), max(1, math.ceil(0.1 * quantised)) * step)
        promoted = []
        for _, name, q in ranked[:k]:
            lp = plan.layer(name)
            promoted.append({"layer": name, "from": lp.precision, "to": q})
            plan = plan.with_precision(name, q, f"repair round {len(rounds)}: promoted from {lp.precision}")
        fid = evaluate(plan)
        rounds.append(_round(len(rounds), fid, goal, promoted))
        log.info("repair round %d: promoted %d layer(s); %s", len(rounds) - 1, len(promoted), _fid_text(fid))
        step *= 2
    return replace(plan, rounds=tuple(rounds)), fid


def _fid_text(f: Fidelity) -> str:
    top1 = f", top-1 {f.top1_agreement:.4f}" if f.top1_agreement is not None else ""
    return f"cosine {f.cosine:.5f}{top1} on {f.samples} held-out samples"


def _round(i: int, fid: Fidelity, goal: FidelityGoal | None, promoted: list) -> dict:
    return {
        "round": i, "fidelity": fid.to_json(), "promoted": promoted,
        "goal": goal.to_json() if goal else None, "met": goal.met(fid) if goal else None,
    }


DEFAULT_GOAL = FidelityGoal("auto", 0.99)
