"""The quantisable units of a model, grouped as runtimes fuse them.

A layer is anchored on one op that decides its precision menu (Conv, MatMul,
an integer-capable pooling or elementwise op, ...) and absorbs the nodes a
runtime fuses into it: BatchNormalization after a convolution, a bias Add
after a MatMul, a Relu/Clip activation. Each layer names its ONNX nodes, the
activation tensors it reads (quantised at its entry), the weights it owns and,
for torch sources, its module path.

Layer ``op`` values are ONNX op types, except ``ActMatMul``: a MatMul of two
activations (attention scores and context), whose menu differs from a MatMul
with a weight.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx

from dscompile.compiler.capabilities import Layer
from dscompile.compiler.graph import ModelGraph, node_macs, static_shapes

WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")
ACT_MATMUL = "ActMatMul"
# Ops onnxruntime (and the other runtimes) run on integers when their inputs are quantised.
INTEGER_OPS = (
    "Add", "Mul", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Resize",
    "Sigmoid", "LeakyRelu", "HardSwish",
)
_BINARY = ("Add", "Mul")  # layers only between two activations (residual adds, SiLU/GELU products)
RECURRENT = ("GRU", "LSTM", "RNN")
CONTROL_FLOW = ("If", "Loop", "Scan")
# Fused after an anchor when they are its only consumer.
_FUSED_NORM = ("BatchNormalization",)
_FUSED_ACT = ("Relu", "Clip", "HardSwish")


@dataclass(frozen=True)
class GraphIndex:
    """Producers and consumers of every tensor of a graph (top level only)."""

    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    initializers: dict[str, onnx.TensorProto]
    graph_outputs: frozenset[str]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> GraphIndex:
        producer: dict[str, onnx.NodeProto] = {}
        consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in model.graph.node:
            for out in node.output:
                producer[out] = node
            for name in node.input:
                if name:
                    consumers[name].append(node)
        inits = {t.name: t for t in model.graph.initializer}
        return cls(producer, dict(consumers), inits, frozenset(o.name for o in model.graph.output))

    def is_constant(self, name: str) -> bool:
        """An initializer, or the output of a Constant node."""
        if name in self.initializers:
            return True
        p = self.producer.get(name)
        return p is not None and p.op_type == "Constant"

    def sole_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        if len(users) != 1 or tensor in self.graph_outputs:
            return None
        return users[0]


def find_layers(graph: ModelGraph) -> list[Layer]:
    """Quantisable layers of ``graph`` in graph order (the model must have unique node names)."""
    model = graph.model
    index = GraphIndex.of(model)
    shapes = static_shapes(model)
    types = tensor_types(model)
    static = static_tensors(model)
    taken: set[str] = set()
    layers: list[Layer] = []
    for node in model.graph.node:
        if node.name in taken:
            continue
        layer = _layer_at(node, index, shapes, types, graph.layer_map, static)
        if layer is None:
            continue
        taken.update(layer.nodes)
        layers.append(layer)
    return layers


def static_tensors(model: onnx.ModelProto) -> frozenset[str]:
    """Tensors that do not depend on the input data: initializers, constants, shapes, and whatever is
    computed from them alone (a detector's anchor grid and strides: Shape -> Range -> Reshape).

    Runtimes fold them into constants (TensorRT does, for a given shape profile): they are not
    activations, and quantizing them moves exact coordinates (YOLOv8's anchor points off by 0.3 cells).
    """
    static = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in _SHAPE_ONLY or all(i in static for i in node.input if i):
            static.update(o for o in node.output if o)
    return frozenset(static)


_SHAPE_ONLY = ("Shape", "Size", "EyeLike")  # outputs that depend on their input's shape, not its values


def _layer_at(
    node: onnx.NodeProto, index: GraphIndex, shapes: dict, types: dict[str, int], layer_map: dict[str, str],
    static: frozenset[str] = frozenset(),
) -> Layer | None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None
    if op == "Gather":
        return _embedding_layer(node, index, layer_map)
    if op in WEIGHTED:
        return _weighted_layer(node, index, shapes, layer_map) if _float_tensor(node.input[0], types) else None
    if op in INTEGER_OPS:
        acts = tuple(i for i in node.input[: _data_inputs(op, node)] if i and not index.is_constant(i) and i not in static)
        if not acts or not all(_float_tensor(a, types) for a in acts):
            return None
        if op in _BINARY and len(acts) != 2:
            return None
        return Layer(node.name, op, (node.name,), acts, tuple(node.output[:1]), module=layer_map.get(node.name))
    if op in RECURRENT or op in CONTROL_FLOW:
        weights = tuple(i for i in node.input if i and i in index.initializers)
        acts = tuple(i for i in node.input if i and i not in index.initializers)
        return Layer(node.name, op, (node.name,), acts, tuple(node.output), weights, layer_map.get(node.name),
                     _param_count(weights, index))
    return None


def _embedding_layer(node: onnx.NodeProto, index: GraphIndex, layer_map: dict[str, str]) -> Layer | None:
    """A Gather from a 2-D float table (token embeddings): quantisable weight-only."""
    table = index.initializers.get(node.input[0])
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    if table is None or len(table.dims) != 2 or table.data_type != onnx.TensorProto.FLOAT or axis != 0:
        return None
    if index.is_constant(node.input[1]):
        return None
    return Layer(node.name, "Gather", (node.name,), (), tuple(node.output[:1]), (node.input[0],),
                 layer_map.get(node.name), int(np.prod(table.dims)), 0)


def _data_inputs(op: str, node: onnx.NodeProto) -> int:
    """How many leading inputs of an op carry data (Resize's roi/scales/sizes do not)."""
    return 1 if op in ("Resize", "MaxPool", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu", "HardSwish") else len(node.input)


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element type of every tensor shape inference can type."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is advisory; untyped tensors are treated as non-float
        inferred = model
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _float_tensor(name: str, types: dict[str, int]) -> bool:
    # Shape arithmetic and indices (int64) are never quantised.
    return types.get(name) in _FLOATS


def _weighted_layer(node: onnx.NodeProto, index: GraphIndex, shapes: dict, layer_map: dict[str, str]) -> Layer | None:
    op = node.op_type
    if len(node.input) < 2:
        return None
    a, b = node.input[0], node.input[1]
    if index.is_constant(a) and not index.is_constant(b):
        return None  # constant @ activation: rare; left to fp32
    weight = b if index.is_constant(b) and b in index.initializers else None
    anchor_op = op if weight or op != "MatMul" else ACT_MATMUL
    if op in ("Conv", "ConvTranspose", "Gemm") and weight is None:
        return None  # weights computed at run time: nothing a weight scheme can hold
    nodes = [node]
    weights = [weight] if weight else []
    if len(node.input) > 2 and node.input[2] and node.input[2] in index.initializers:
        weights.append(node.input[2])
    inputs = (a,) if weight else (a, b)
    tail, internal = node, []
    for kinds in (_FUSED_NORM, ("Add",), _FUSED_ACT):
        nxt = index.sole_consumer(tail.output[0])
        if nxt is None or nxt.op_type not in kinds:
            continue
        if nxt.op_type == "Add" and not (anchor_op == "MatMul" and _is_bias_add(nxt, tail.output[0], index)):
            continue
        if nxt.op_type == "BatchNormalization" and op not in ("Conv", "ConvTranspose"):
            continue
        if nxt.op_type == "Clip" and any(not index.is_constant(i) for i in nxt.input[1:] if i):
            continue
        nodes.append(nxt)
        weights.extend(i for i in nxt.input if i in index.initializers and nxt.op_type != "Clip")
        if nxt.op_type == "HardSwish":
            internal.append(tail.output[0])
        tail = nxt
    params = _param_count(tuple(weights[:1]), index)
    macs = node_macs(node, shapes)
    module = layer_map.get(node.name) or next((layer_map[n.name] for n in nodes if n.name in layer_map), None)
    return Layer(node.name, anchor_op, tuple(n.name for n in nodes), inputs, (tail.output[0],), tuple(weights),
                 module, params, macs, internal=tuple(internal))


def _is_bias_add(add: onnx.NodeProto, from_tensor: str, index: GraphIndex) -> bool:
    other = [i for i in add.input if i != from_tensor]
    if len(other) != 1 or other[0] not in index.initializers:
        return False
    return len(index.initializers[other[0]].dims) <= 1


def _param_count(names: tuple[str, ...], index: GraphIndex) -> int:
    total = 0
    for n in names:
        t = index.initializers.get(n)
        if t is not None:
            total += int(np.prod(t.dims)) if t.dims else 1
    return total


def layer_weight(layer: Layer) -> str | None:
    """The main weight of a weighted layer (the first of ``weights``), else None."""
    return layer.weights[0] if layer.op in WEIGHTED and layer.weights else None
