"""Helpers for the distillation tests and benchmark: uniform plans with measured activation ranges."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from dscompile.compiler.distill_capture import Capturer
from dscompile.compiler.distill_ops import ANCHORS, layer_spec
from dscompile.compiler.graph import ModelGraph
from dscompile.compiler.plan import LayerPlan, QuantPlan


def uniform_plan(graph: ModelGraph, precision: str, samples: Sequence[dict], weight_bits: int | None = None,
                 symmetric: bool = False, target: str = "ort-cpu") -> QuantPlan:
    """Every Conv/Gemm/MatMul-with-weight layer (+ its bias Add and activation) at one precision."""
    model = graph.model
    inits = {t.name for t in model.graph.initializer}
    groups = []
    for node in model.graph.node:
        if node.op_type in ANCHORS and len(node.input) > 1 and node.input[1] in inits:
            others = tuple(n.name for n in model.graph.node if n.op_type not in ANCHORS)
            spec = layer_spec(model, node.name, (node.name, *others))
            if spec is not None:
                names = [spec.anchor.name] + ([spec.bias_node.name] if spec.bias_node else []) + [a.name for a in spec.acts]
                groups.append((spec, tuple(names)))
    ranges = Capturer(model, [s.x for s, _ in groups]).run(samples, [s.x for s, _ in groups])
    layers = []
    for spec, names in groups:
        x = ranges[spec.x]
        acts = ({"method": "minmax", "amax": float(np.abs(x).max())} if symmetric else
                {"method": "minmax", "min": float(x.min()), "max": float(x.max())})
        weights = {"scheme": "per_channel"} | ({"bits": weight_bits} if weight_bits else {})
        layers.append(LayerPlan(spec.anchor.name, names, spec.anchor.op_type, precision, weights=weights,
                                activations=acts if precision in ("int8", "int16x8") else {}))
    return QuantPlan(target, graph.sha256, tuple(layers))


def feeds_of(x: np.ndarray, name: str) -> list[dict]:
    return [{name: x[i:i + 1]} for i in range(len(x))]
