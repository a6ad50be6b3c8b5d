"""Layers as a runtime fuses them, from an ONNX model: the units the roofline costs.

TensorRT, the QNN HTP and onnxruntime all fuse a Conv/Gemm/MatMul with the
element-wise ops that follow it (BatchNormalization, activations, a residual
Add) into one kernel, so the estimate counts one launch and one round trip of
activations per fused group. Shape-only ops cost nothing; other ops (pooling,
concat, softmax, normalisation) are layers of their own with no MACs.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from dscompile.compiler.capabilities import Layer
from dscompile.compiler.graph import node_macs, static_shapes

from dscompile.errors import InputError

ANCHORS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulInteger", "ConvInteger", "MatMulNBits", "QLinearConv", "QLinearMatMul"}
FUSABLE = {
    "BatchNormalization", "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Add", "Mul", "Sub", "Div", "Gelu", "Erf", "PRelu", "Elu", "Selu", "Softplus",
}
FREE = {
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Shape", "Constant", "ConstantOfShape", "Identity",
    "Cast", "Gather" , "Range", "Slice", "Expand", "QuantizeLinear", "DequantizeLinear", "Dropout",
}


def with_batch(model: onnx.ModelProto, batch: int = 1) -> onnx.ModelProto:
    """A copy whose inputs have a fixed leading dimension, so shape inference is static."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch
        bad = [i for i, d in enumerate(dims) if not d.HasField("dim_value")]
        if bad:
            raise InputError(
                f"input {vi.name!r} has dynamic axis {bad[0]}: give its size to estimate (e.g. --input-shape)"
            )
    return m


def extract_layers(model: onnx.ModelProto) -> list[Layer]:
    """Fused layers with per-sample params, MACs and activation elements."""
    model = with_batch(model, 1)
    shapes = static_shapes(model)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = list(model.graph.node)
    names = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(nodes)]
    consumers: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        for t in n.input:
            consumers[t].append(i)
    outputs = {o.name for o in model.graph.output}
    taken: set[int] = set()
    layers: list[Layer] = []
    for i, node in enumerate(nodes):
        if i in taken or node.op_type in FREE:
            continue
        group = [i] + (_absorb(i, nodes, consumers, outputs, taken) if node.op_type in ANCHORS else [])
        taken.update(group)
        layers.append(_layer(group, nodes, names, shapes, inits, consumers, outputs))
    return layers


def _absorb(start: int, nodes, consumers, outputs, taken) -> list[int]:
    """Follow single-consumer element-wise successors of an anchor (one residual Add at most)."""
    group: list[int] = []
    cur = start
    while True:
        out = nodes[cur].output[0]
        users = consumers.get(out, [])
        if len(users) != 1 or out in outputs:
            return group
        nxt = users[0]
        if nxt in taken or nodes[nxt].op_type not in FUSABLE:
            return group
        group.append(nxt)
        cur = nxt


def _elems(shape: tuple[int, ...] | None) -> int:
    return int(np.prod(shape)) if shape else 0


def _layer(group, nodes, names, shapes, inits, consumers, outputs) -> Layer:
    members = set(group)
    produced = {o for g in group for o in nodes[g].output}
    anchor = nodes[group[0]]
    weights = tuple(dict.fromkeys(t for g in group for t in nodes[g].input if t in inits))
    # BatchNormalization statistics fold into the conv: count only the anchor's weights.
    params = sum(_elems(tuple(inits[t].dims)) or 1 for t in anchor.input if t in inits)
    ins = tuple(dict.fromkeys(t for g in group for t in nodes[g].input if t and t not in inits and t not in produced))
    outs = tuple(o for o in produced if o in outputs or any(c not in members for c in consumers.get(o, [])))
    act = sum(_elems(shapes.get(t)) for t in ins + outs)
    macs = sum(node_macs(nodes[g], shapes) for g in group)
    return Layer(
        name=names[group[0]], op=anchor.op_type, nodes=tuple(names[g] for g in group), inputs=ins, outputs=outs,
        weights=weights, params=params if anchor.op_type in ANCHORS else 0, macs=macs, activation_elems=act,
    )
