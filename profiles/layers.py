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
RECURRENT_GATES = {"GRU": 3, "LSTM": 4, "RNN": 1}  # matrix products per time step, per direction
ANCHORS |= set(RECURRENT_GATES)
FUSABLE = {
    "BatchNormalization", "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Add", "Mul", "Sub", "Div", "Gelu", "Erf", "PRelu", "Elu", "Selu", "Softplus",
}
FREE = {
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Shape", "Constant", "ConstantOfShape", "Identity",
    "Cast", "Gather", "Range", "Slice", "Expand", "QuantizeLinear", "DequantizeLinear", "Dropout",
    "Concat",  # runtimes write the inputs into the output buffer in place
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


def fold_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The float graph under a QDQ model, and the precision each anchor node runs at.

    DequantizeLinear of an initializer becomes that initializer (the weight);
    QuantizeLinear -> DequantizeLinear on an activation is bypassed. An anchor
    whose weight was quantized runs at int8 (int4 for 4-bit weights, weight-only
    when its activation input was not quantized); one with fp16 weights at fp16.
    """
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    alias: dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            alias[n.output[0]] = n.input[0]
        elif n.op_type == "DequantizeLinear" and n.input[0] in producer and producer[n.input[0]].op_type == "QuantizeLinear":
            alias[n.output[0]] = producer[n.input[0]].input[0]
    outputs = {o.name for o in model.graph.output}
    dropped_dq = {o for o in alias if o not in outputs}
    users: dict[str, list[str]] = defaultdict(list)
    for n in model.graph.node:
        for t in n.input:
            users[t].append(n.output[0] if n.output else "")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = []
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.output[0] in dropped_dq:
            continue
        if n.op_type == "QuantizeLinear" and users[n.output[0]] and all(u in dropped_dq for u in users[n.output[0]]):
            continue
        keep.append(n)
    precisions: dict[str, str] = {}
    for i, n in enumerate(keep):
        if n.op_type in ANCHORS and len(n.input) > 1:
            w, x = n.input[1], n.input[0]
            if w in alias and alias[w] in inits:
                bits = inits[alias[w]].data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
                precisions[n.name or f"{n.op_type}_{i}"] = ("int4_weight" if bits else "int8") if x in alias else (
                    "int4_weight" if bits else "int8_weight")
            elif w in inits and inits[w].data_type == onnx.TensorProto.FLOAT16:
                precisions[n.name or f"{n.op_type}_{i}"] = "fp16"
        for j, name in enumerate(n.input):
            if name in alias:
                n.input[j] = alias[name]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m, precisions


def extract_layers(model: onnx.ModelProto, unfused: frozenset[str] | set[str] = frozenset()) -> list[Layer]:
    """Fused layers with per-sample params, MACs and activation elements.

    ``unfused`` names element-wise ops the target runtime does not fuse into the
    preceding layer (a device class's ``unfused_ops``); they become layers of their own.
    """
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
        group = [i] + (_absorb(i, nodes, consumers, outputs, taken, FUSABLE - set(unfused)) if node.op_type in ANCHORS else [])
        taken.update(group)
        layers.append(_layer(group, nodes, names, shapes, inits, consumers, outputs))
    return layers


def _absorb(start: int, nodes, consumers, outputs, taken, fusable: set[str]) -> list[int]:
    """Follow single-consumer element-wise successors of an anchor (one residual Add at most)."""
    group: list[int] = []
    cur = start
    while True:
        out = nodes[cur].output[0]
        users = consumers.get(out, [])
        if len(users) != 1 or out in outputs:
            return group
        nxt = users[0]
        if nxt in taken or nodes[nxt].op_type not in fusable:
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
    macs = sum(node_macs(nodes[g], shapes) + _recurrent_macs(nodes[g], shapes) for g in group)
    return Layer(
        name=names[group[0]], op=anchor.op_type, nodes=tuple(names[g] for g in group), inputs=ins, outputs=outs,
        weights=weights, params=params if anchor.op_type in ANCHORS else 0, macs=macs, activation_elems=act,
        depthwise=_is_depthwise(anchor, inits),
    )


def _recurrent_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """GRU/LSTM/RNN: steps x directions x gates x hidden x (input + hidden), from X and W's shapes."""
    gates = RECURRENT_GATES.get(node.op_type)
    x, w = shapes.get(node.input[0]), shapes.get(node.input[1]) if len(node.input) > 1 else None
    if not gates or not x or not w or len(x) != 3:
        return 0
    layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
    steps, batch = (x[1], x[0]) if layout else (x[0], x[1])
    directions, hidden_x_gates, inputs = w
    hidden = hidden_x_gates // gates
    return steps * batch * directions * gates * hidden * (inputs + hidden)


def _is_depthwise(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """A Conv with one input channel per group and more than one group."""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
        return False
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    dims = inits[node.input[1]].dims
    return group > 1 and len(dims) > 1 and dims[1] == 1
