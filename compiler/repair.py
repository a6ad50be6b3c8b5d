"""Repair loop: build, measure on held-out data, promote layers until the fidelity floor holds.

Each round promotes the layers with the best predicted fidelity gain per unit
of cost (gain: the drop in the layer's sensitivity from its current precision
to the next safer one on its menu; cost: the added latency and bytes, as
fractions of FP32). The number promoted doubles each round, so a badly missed
floor converges in a few rounds. Under a ``size``/``latency`` budget the other
layers are re-allocated around the promoted ones so the budget still holds
(``repair_budget.py``). Every round is recorded in the plan.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from dscompile.compiler.capabilities import FP32
from dscompile.compiler.plan import LayerPlan, QuantPlan
from dscompile.compiler.repair_budget import Cap, fixed_costs, plan_cap, promote_within, repredict
from dscompile.compiler.verify import Fidelity, UserMetric
from dscompile.errors import InputError, VerificationError
from dscompile.usercode import import_callable

log = logging.getLogger("dscompile")
METRICS = ("cosine", "top1", "auto")
DEFAULT_ROUNDS = 6


@dataclass(frozen=True)
class FidelityGoal:
    metric: str  # cosine | top1 | auto (top1 for score outputs, cosine otherwise) | MODULE:FUNCTION
    value: float
    user: UserMetric | None = None  # set when ``metric`` names the user's function

    def measure(self, f: Fidelity) -> float:
        if self.user is not None:
            if f.user is None:
                raise VerificationError(f"fidelity metric {self.metric} was not measured")
            return f.user
        if self.metric in ("top1", "auto"):
            return f.top1_agreement if f.top1_agreement is not None else f.cosine
        return f.cosine

    def met(self, f: Fidelity) -> bool:
        return self.measure(f) >= self.value

    def to_json(self) -> dict[str, float]:
        return {self.metric: self.value}


def parse_goal(text: str, trust_code: bool = False) -> FidelityGoal:
    """``cosine=0.995``, ``top1=0.99``, ``auto=0.99``, or ``MODULE:FUNCTION=V`` (the user's metric, a
    mean over held-out samples of ``FUNCTION(reference_outputs, candidate_outputs, feed)``; higher is
    better; importing it runs code, so it needs ``trust_code``)."""
    metric, sep, val = text.rpartition("=")
    try:
        value = float(val)
    except ValueError:
        value = float("nan")
    if ":" in metric:
        if not sep or not math.isfinite(value):
            raise InputError(f"--min-fidelity {text!r}: expected MODULE:FUNCTION=<floor>")
        if not trust_code:
            raise InputError(f"--min-fidelity {text!r}: a user metric runs Python code; pass --trust-code to allow it")
        ref = metric.strip()
        return FidelityGoal(ref, value, UserMetric(ref, import_callable(ref, "--min-fidelity")))
    metric = metric.strip().lower().replace("top1_agreement", "top1").replace("top-1", "top1")
    if not sep or metric not in METRICS or not (0 < value <= 1):
        raise InputError(f"--min-fidelity {text!r}: expected cosine=<0..1>, top1=<0..1>, auto=<0..1> "
                         "or MODULE:FUNCTION=<floor> (with --trust-code)")
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
    """Promote layers until ``evaluate(plan)`` meets ``goal``; the final plan carries every round.

    Under a ``size``/``latency`` budget each promotion is paired with the demotions that keep the
    budget (``compiler/repair_budget.py``), and a round that measures worse than the best plan so far
    is undone (its promotions are not tried again).
    """
    fid = evaluate(plan)
    rounds = [_round(0, fid, goal, [])]
    cap, fixed = plan_cap(plan), fixed_costs(plan)
    best, pinned, banned = (plan, fid), {}, set()
    step = 1
    while goal is not None and not goal.met(fid):
        if len(rounds) > max_rounds:
            raise VerificationError(
                f"--min-fidelity {goal.metric}={goal.value}: reached {goal.measure(best[1]):.5f} after {max_rounds} "
                f"repair rounds{_within(cap)} (raise the budget, lower the floor, or pin layers to fp32 in a plan)"
            )
        ranked = [(name, q) for name, q in _ranked(plan) if (name, q) not in banned]
        if not ranked:
            raise VerificationError(
                f"--min-fidelity {goal.metric}={goal.value}: {goal.measure(fid):.5f} with every layer at its safest precision"
            )
        quantised = sum(lp.precision != FP32 for lp in plan.layers)
        k = min(len(ranked), max(1, math.ceil(0.1 * quantised)) * step)
        if cap is None:
            plan, promoted, demoted = _promote(plan, ranked[:k], len(rounds))
        else:
            fit = promote_within(plan, ranked, k, cap, pinned)
            if fit is None:
                raise VerificationError(
                    f"--min-fidelity {goal.metric}={goal.value}: reached {goal.measure(best[1]):.5f}; no further "
                    f"promotion fits{_within(cap)} (raise the budget or lower the floor)"
                )
            precisions, accepted, pinned = fit
            plan, promoted, demoted = _apply(plan, precisions, dict(accepted), len(rounds))
        plan = repredict(plan, fixed)
        fid = evaluate(plan)
        record = _round(len(rounds), fid, goal, promoted, demoted, plan.predicted)
        measured = _fid_text(fid)
        if cap is not None and goal.measure(fid) < goal.measure(best[1]):
            banned |= {(m["layer"], m["to"]) for m in promoted}
            record["reverted"] = True  # worse than the best so far: back to it, these promotions are not retried
            plan, fid = best
            pinned = {k_: v for k_, v in pinned.items() if (k_, v) not in banned}
        elif goal.measure(fid) >= goal.measure(best[1]):
            best = (plan, fid)
        rounds.append(record)
        log.info("repair round %d: promoted %d, moved %d layer(s)%s; %s", len(rounds) - 1, len(promoted),
                 len(demoted), " (undone: worse than the best so far)" if record.get("reverted") else "", measured)
        step *= 2
    return replace(plan, rounds=tuple(rounds)), fid


def _ranked(plan: QuantPlan) -> list[tuple[str, str]]:
    """(layer, next safer precision), best predicted fidelity gain per cost first."""
    fp32_bytes = plan.predicted.get("fp32_bytes", 1) or 1
    fp32_ms = plan.predicted.get("fp32_latency_ms", 1) or 1
    ranked = []
    for lp in plan.layers:
        promo = _promotion(lp, fp32_bytes, fp32_ms)
        if promo is not None:
            ranked.append((promo[0], lp.name, promo[1]))
    ranked.sort(reverse=True)
    return [(name, q) for _, name, q in ranked]


def _promote(plan: QuantPlan, todo: list[tuple[str, str]], i: int) -> tuple[QuantPlan, list, list]:
    promoted = []
    for name, q in todo:
        lp = plan.layer(name)
        promoted.append({"layer": name, "from": lp.precision, "to": q})
        plan = plan.with_precision(name, q, f"repair round {i}: promoted from {lp.precision}")
    return plan, promoted, []


def _apply(plan: QuantPlan, precisions: dict[str, str], accepted: dict[str, str], i: int) -> tuple[QuantPlan, list, list]:
    """The re-solved precisions: the accepted promotions, and the layers moved to keep the budget."""
    promoted, demoted = [], []
    for lp in plan.layers:
        q = precisions.get(lp.name, lp.precision)
        if q == lp.precision:
            continue
        if accepted.get(lp.name) == q:
            promoted.append({"layer": lp.name, "from": lp.precision, "to": q})
            why = f"repair round {i}: promoted from {lp.precision}"
        else:
            demoted.append({"layer": lp.name, "from": lp.precision, "to": q})
            why = f"repair round {i}: moved from {lp.precision} to keep the budget"
        plan = plan.with_precision(lp.name, q, why)
    return plan, promoted, demoted


def _within(cap: Cap | None) -> str:
    return f" within {cap.budget.kind}={cap.budget.value:g}" if cap is not None else ""


def _fid_text(f: Fidelity) -> str:
    top1 = f", top-1 {f.top1_agreement:.4f}" if f.top1_agreement is not None else ""
    user = f", {f.user_metric} {f.user:.5f}" if f.user is not None else ""
    return f"cosine {f.cosine:.5f}{top1}{user} on {f.samples} held-out samples"


def _round(i: int, fid: Fidelity, goal: FidelityGoal | None, promoted: list, demoted: list | None = None,
           predicted: dict | None = None) -> dict:
    out = {
        "round": i, "fidelity": fid.to_json(), "promoted": promoted,
        "goal": goal.to_json() if goal else None, "met": goal.met(fid) if goal else None,
    }
    if demoted:
        out["moved"] = demoted
    if predicted and i > 0:
        out["predicted"] = {k: predicted[k] for k in ("size_ratio", "latency_ratio") if k in predicted}
    return out


DEFAULT_GOAL = FidelityGoal("auto", 0.99)
