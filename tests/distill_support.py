"""Helpers for the distillation tests and benchmark: uniform plans (one precision per op type)
with activation ranges measured on samples, in the format compiler/dmpq.py writes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dscompile.compiler.capabilities import FP32, INT4_WEIGHT, INT8
from dscompile.compiler.distill_capture import Capturer
from dscompile.compiler.graph import ModelGraph
from dscompile.compiler.layers import find_layers
from dscompile.compiler.normalize import prepared
from dscompile.compiler.plan import LayerPlan, QuantPlan, needed_tensors

WEIGHT_SCHEMES = {
    INT8: {"scheme": "int8_per_channel_symmetric", "bits": 8},
    INT4_WEIGHT: {"scheme": "int4_block_zero_point", "bits": 4, "block_size": 32},
}


def uniform_plan(graph: ModelGraph, precisions: dict[str, str], samples: Sequence[dict], weight_bits: int | None = None,
                 target: str = "ort-cpu") -> QuantPlan:
    """``precisions``: op type -> precision (others fp32). ``weight_bits`` overrides int8's weight bits
    (4: an emulated W4A8 grid that no ort-cpu kernel runs, for the simulation only)."""
    g = prepared(graph)
    layers = find_layers(g)
    outs = {o.name for o in g.model.graph.output}
    consts = {t.name for t in g.model.graph.initializer}
    chosen = [(lay, precisions.get(lay.op, FP32)) for lay in layers]
    tensors = sorted({t for lay, p in chosen if p == INT8 for t in needed_tensors(lay, outs) if t not in consts})
    got = Capturer(g.model, tensors).run(samples, tensors) if tensors else {}
    plans = []
    for lay, p in chosen:
        weights = dict(WEIGHT_SCHEMES.get(p, {"scheme": "fp32"}))
        if p == INT8 and weight_bits:
            weights["bits"] = weight_bits
        acts = {}
        if p == INT8:
            acts = {"method": "minmax", "symmetric": False, "ranges": {
                t: {"min": float(np.min(got[t])), "max": float(np.max(got[t]))}
                for t in needed_tensors(lay, outs) if t in got}}
        plans.append(LayerPlan(lay.name, lay.nodes, lay.op, p, lay.module, weights, acts))
    return QuantPlan(target, graph.sha256, tuple(plans))


def feeds_of(x: np.ndarray, name: str) -> list[dict]:
    return [{name: x[i:i + 1]} for i in range(len(x))]
