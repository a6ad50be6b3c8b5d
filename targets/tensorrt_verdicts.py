"""The TensorRT rule checker's verdicts per layer and precision, for DMPQ's menu.

DMPQ must not choose a precision TensorRT would refuse or run no faster. So before planning, the
model is lowered once with every layer that can take INT8 at INT8 and once with every layer that
can take INT4 weights at INT4 (unit ranges: the rules look at types, shapes and placement, not at
scales), and the rule checker runs on each probe. Its findings, mapped back to the layer that owns
the node, become: errors -> the precision is vetoed (``check``: a hand-edited plan is refused too);
advice and warnings (e.g. an INT8 GEMM with K < 16, a 3-channel INT8 conv) -> DMPQ leaves the
precision out (``advice``: a hand-edited plan may still ask for it). A layer the lowering itself
moves off the precision (INT4 on a weight TensorRT cannot pack) is advice too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from dscompile.calibration.table import CalibrationTable, TensorRange
from dscompile.compiler.capabilities import FP32, INT4_WEIGHT, INT8, Layer
from dscompile.compiler.graph import ModelGraph, static_shapes
from dscompile.compiler.layers import find_layers
from dscompile.compiler.plan import LayerPlan, QuantPlan
from dscompile.errors import InputError
from dscompile.targets.tensorrt_plan import MENU
from dscompile.targets.tensorrt_qdq import AMAX_METHOD, lower_plan
from dscompile.targets.tensorrt_rules import Finding, check_model
from dscompile.targets.tensorrt_versions import TensorRTRelease

PROBED = (INT8, INT4_WEIGHT)
# Findings that do not depend on the layer's precision (they hold for the FP32 model as well).
_NOT_PRECISION = ("op_support", "opset_range", "residual_add_unquantized")


@dataclass(frozen=True)
class LayerVerdicts:
    """(layer, precision) -> what the checker says; ``check``/``advise`` plug into TargetCapabilities."""

    errors: dict[tuple[str, str], str] = field(default_factory=dict)
    advice: dict[tuple[str, str], str] = field(default_factory=dict)

    def check(self, layer: Layer, precision: str) -> str | None:
        return self.errors.get((layer.name, precision))

    def advise(self, layer: Layer, precision: str) -> str | None:
        return self.advice.get((layer.name, precision))


def layer_verdicts(graph: ModelGraph, release: TensorRTRelease, target: str = "jetson-orin") -> LayerVerdicts:
    """Probe-lower the model at each precision of ``PROBED`` and check it with ``release``'s rules."""
    layers = find_layers(graph)
    verdicts = LayerVerdicts()
    for precision in PROBED:
        chosen = [lay for lay in layers if precision in MENU.for_op(lay.op)]
        if not chosen:
            continue
        names = {lay.name for lay in chosen}
        plan = QuantPlan(target, graph.sha256, tuple(
            LayerPlan(lay.name, lay.nodes, lay.op, precision if lay.name in names else FP32, lay.module) for lay in layers))
        try:
            model, placement = lower_plan(graph, plan, _unit_table(graph.model))
        except InputError as exc:  # the probe itself cannot be built: say so per layer, decide nothing else
            for lay in chosen:
                verdicts.advice[(lay.name, precision)] = f"TensorRT lowering at {precision} failed: {exc}"
            continue
        for name, why in placement.skipped.items():
            if name in names:
                verdicts.advice[(name, precision)] = f"TensorRT lowering keeps it higher: {why}"
        owner = _owner(model, layers)
        for f in check_model(model, release, static_shapes(model)).findings:
            layer = owner(f.node)
            if f.rule in _NOT_PRECISION or layer not in names:
                continue
            into = verdicts.errors if f.severity == "error" else verdicts.advice
            key = (layer, precision)
            if key not in into:
                into[key] = _say(f, release)
            elif f"rule {f.rule} " not in into[key]:
                into[key] += f"; also rule {f.rule} ({f.message})"
    return verdicts


def _say(f: Finding, release: TensorRTRelease) -> str:
    return f"TensorRT rule {f.rule} ({release.label}, node {f.node!r}): {f.message}"


def _unit_table(model: onnx.ModelProto) -> CalibrationTable:
    """A range of [-1, 1] for every tensor: the probe needs Q/DQ in place, not meaningful scales."""
    names = {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
    unit = TensorRange(-1.0, 1.0, 1.0, {AMAX_METHOD: 1.0}, {})
    return CalibrationTable("probe", "probe", 1, dict.fromkeys(names, unit))


def _owner(model: onnx.ModelProto, layers: list[Layer]):
    """node name -> the layer it belongs to; inserted Q/DQ/Cast nodes belong to the layer they feed."""
    by_node = {n: lay.name for lay in layers for n in lay.nodes}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    nodes = {n.name: n for n in model.graph.node}

    def find(name: str) -> str | None:
        seen, todo = set(), [name]
        while todo:
            cur = todo.pop(0)
            if cur in by_node:
                return by_node[cur]
            if cur in seen or cur not in nodes or len(seen) > 16:
                continue
            seen.add(cur)
            todo += [c.name for o in nodes[cur].output for c in consumers.get(o, [])]
        return None

    return find
