"""What distillation works on and hands back: planned layers with their grids, the current
weights, and the write-back into a ModelGraph and QuantPlan.

Hand-off: the distilled model is an ordinary float ModelGraph whose quantised
weights lie exactly on their grid (each group's largest element kept at
+-qmax), so any lowering that quantises weights by round-to-nearest with
absmax scales reproduces the learned integers bit for bit; no target needs a
second weight format. Biases are plain float edits. Learned activation ranges
go into ``LayerPlan.activations``; ``LayerPlan.extra["distill"]`` records what
was done and the scales used.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from dscompile.compiler.capabilities import FP16, FP32
from dscompile.compiler.distill_ops import ANCHORS, LayerSpec, constants, initializer, layer_spec
from dscompile.compiler.distill_quant import (
    ActGrid,
    WeightGrid,
    act_grid,
    dequantize,
    group_ids,
    quantize_rtn,
    rtn_params,
    weight_grid,
)
from dscompile.compiler.graph import ModelGraph
from dscompile.compiler.plan import LayerPlan, QuantPlan
from dscompile.fileio import sha256_bytes

FLOAT_PRECISIONS = (FP32, FP16)


@dataclass
class PlannedLayer:
    """One weight-quantised layer: its plan entry, torch-side spec, grid and RTN baseline."""

    plan: LayerPlan
    spec: LayerSpec
    grid: WeightGrid
    ids: np.ndarray
    w: np.ndarray  # FP32 weight
    b: np.ndarray | None  # FP32 bias
    scales: np.ndarray  # RTN scales per group (what the lowering computes)
    zps: np.ndarray  # RTN zero points per group (0 on symmetric grids)
    act: ActGrid | None  # entry quantiser of the layer's input
    act_y: ActGrid | None  # the lowering's requantisation of the layer's output (static int8)
    # current choice (starts at round-to-nearest):
    q: np.ndarray = field(default=None)  # type: ignore[assignment]
    q_scales: np.ndarray = field(default=None)  # type: ignore[assignment]
    q_zps: np.ndarray = field(default=None)  # type: ignore[assignment]
    b_now: np.ndarray | None = None
    act_now: ActGrid | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.q is None:
            self.reset()

    def reset(self) -> None:
        self.q, self.q_scales, self.q_zps = self.q_rtn(), self.scales, self.zps
        self.b_now, self.act_now = self.b, self.act

    def q_rtn(self) -> np.ndarray:
        return quantize_rtn(self.w, self.scales, self.zps, self.ids, self.grid)

    def w_now(self) -> np.ndarray:
        return dequantize(self.q, self.q_scales, self.q_zps, self.ids)

    @property
    def bias_name(self) -> str | None:
        """The bias initializer: the layer's own, or the one bias correction adds to a Conv/Gemm."""
        if self.spec.bias:
            return self.spec.bias
        return f"{self.spec.weight}__distill_bias" if self.b_now is not None else None

    def w_rtn(self) -> np.ndarray:
        return dequantize(self.q_rtn(), self.scales, self.zps, self.ids)


def planned_layers(model: onnx.ModelProto, plan: QuantPlan) -> tuple[list[PlannedLayer], list[str]]:
    """Weight-quantised plan layers in graph order, and notes on the ones reconstruction cannot take."""
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    layers, skipped = [], []
    for lp in plan.layers:
        if lp.precision in FLOAT_PRECISIONS or lp.weights.get("scheme") == "fp32" and lp.op in ANCHORS:
            continue
        spec = layer_spec(model, lp.name, lp.nodes)
        if spec is None:
            if lp.op in ANCHORS:
                skipped.append(f"{lp.name}: no {lp.op} with a constant weight to reconstruct")
            continue
        w = initializer(model, spec.weight)
        if w.dtype != np.float32 or w.ndim < 2:
            skipped.append(f"{lp.name}: weight {spec.weight!r} is not a float matrix")
            continue
        grid = weight_grid(lp.precision, lp.weights, spec.op.op, tuple(w.shape), spec.trans_b)
        ids = group_ids(tuple(w.shape), grid)
        b = initializer(model, spec.bias) if spec.bias else None
        scales, zps = rtn_params(w, ids, grid)
        outs = {o.name for o in model.graph.output}
        act_y = act_grid(lp.precision, lp.activations, spec.y) if spec.y not in outs else None
        layers.append(PlannedLayer(lp, spec, grid, ids, w, b, scales, zps,
                                   act_grid(lp.precision, lp.activations, spec.x), act_y))
    layers.sort(key=lambda pl: order.get(pl.spec.anchor.name, 0))
    return layers, skipped


def shared_weights(layers: list[PlannedLayer]) -> set[str]:
    """Weights read by more than one planned layer: rounding them for one would change the other."""
    seen: dict[str, int] = {}
    for pl in layers:
        seen[pl.spec.weight] = seen.get(pl.spec.weight, 0) + 1
    return {k for k, v in seen.items() if v > 1}


def current_weights(layers: list[PlannedLayer]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for pl in layers:
        out[pl.spec.weight] = pl.w_now()
        if pl.bias_name and pl.b_now is not None:
            out[pl.bias_name] = pl.b_now
    return out


def current_entries(layers: list[PlannedLayer]) -> tuple[dict[str, ActGrid], dict[str, tuple[str, ActGrid]]]:
    """(static quantisers per tensor, as the lowering shares them; dynamic ones per node)."""
    tensors: dict[str, ActGrid] = {}
    nodes: dict[str, tuple[str, ActGrid]] = {}
    for pl in layers:
        if pl.act_now is not None and pl.act_now.dynamic:
            nodes[pl.spec.anchor.name] = (pl.spec.x, pl.act_now)
        elif pl.act_now is not None:
            tensors[pl.spec.x] = pl.act_now
    for pl in layers:
        if pl.act_y is not None:
            tensors.setdefault(pl.spec.y, pl.act_y)
    return tensors, nodes


def with_biases(model: onnx.ModelProto, layers: list[PlannedLayer]) -> onnx.ModelProto:
    """A copy where every Conv/Gemm layer that gained a bias (from bias correction) reads it."""
    m = copy.deepcopy(model)
    by_name = {n.name: n for n in m.graph.node}
    for pl in layers:
        if pl.spec.bias is None and pl.b_now is not None:
            m.graph.initializer.append(numpy_helper.from_array(pl.b_now.astype(np.float32), pl.bias_name))
            node = by_name[pl.spec.anchor.name]
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = pl.bias_name
    return m


def write_back(graph: ModelGraph, layers: list[PlannedLayer]) -> ModelGraph:
    """The distilled ModelGraph: on-grid weights and corrected biases in place of the FP32 ones."""
    model = with_biases(graph.model, layers)
    values = current_weights(layers)
    for t in model.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(values[t.name].astype(np.float32), t.name))
    return ModelGraph(model, graph.inputs, graph.outputs, graph.source, dict(graph.layer_map))


def annotate_plan(plan: QuantPlan, layers: list[PlannedLayer], summary: dict[str, Any]) -> QuantPlan:
    """The plan with each distilled layer's notes recorded, and learned (LSQ) input ranges written into
    every layer entry that names the tensor (the lowering takes a tensor's range from its first entry)."""
    by_name = {pl.plan.name: pl for pl in layers}
    learned = {pl.spec.x: pl.act_now.range_json() for pl in layers
               if pl.act_now is not None and pl.act is not None and not pl.act.dynamic and pl.act_now.scale != pl.act.scale}
    out = []
    for lp in plan.layers:
        pl = by_name.get(lp.name)
        acts = lp.activations
        hit = [t for t in acts.get("ranges", {}) if t in learned] if isinstance(acts, dict) else []
        if hit:
            acts = {**acts, "ranges": {**acts["ranges"], **{t: learned[t] for t in hit}}, "learned": "lsq"}
        if pl is None:
            out.append(replace(lp, activations=acts))
            continue
        extra = dict(lp.extra)
        extra["distill"] = {**pl.notes, "weight_grid": pl.grid.describe(),
                            "weight_sha256": sha256_bytes(pl.w_now().tobytes())}
        out.append(replace(lp, extra=extra, activations=acts))
    predicted = dict(plan.predicted)
    predicted["distill"] = summary
    return replace(plan, layers=tuple(out), predicted=predicted)


def small_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return constants(model)
