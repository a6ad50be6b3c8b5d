"""Where ort-cpu puts Q/DQ: the placement policy that makes onnxruntime run integer kernels.

onnxruntime's CPU provider fuses ``DQ -> op -> Q`` groups into QLinearConv,
QLinearMatMul/MatMulIntegerToFloat, QGemm, QLinearAdd, ... when:
- activations are uint8 with a zero point (x86 u8s8 kernels), weights int8
  symmetric per output channel, Conv/Gemm bias int32 at input x weight scale;
- a static int8 layer's output is quantised too (QLinearConv needs its output
  scale; a following Relu/Clip folds into the zero point);
- data-movement ops between quantised tensors (Reshape, Transpose, MaxPool,
  Resize, ...) keep the *same* scale on both sides, so the Q/DQ around them drop.
- HardSwish has no integer kernel; x * relu6(x + 3) / 6 runs as QLinearAdd + QLinearMul:
  the Add's output quantised on [0, 6] (the Q's saturation is the relu6) and read back
  with a scale six times smaller (the / 6), so no layer boundary leaves the integers.
Dynamic int8 and int4 layers become onnxruntime's DynamicQuantizeMatMul and
MatMulNBits; fp16 (forced only) stores weights in half precision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from dscompile.compiler import gptq, qdq
from dscompile.compiler.capabilities import (
    FP16,
    FP32,
    INT4_WEIGHT,
    INT8,
    INT8_DYNAMIC,
    INT8_WEIGHT,
    Layer,
)
from dscompile.compiler.layers import ACT_MATMUL, GraphIndex
from dscompile.errors import InputError

# Ops whose output keeps the input's quantisation parameters (Q/DQ around them drop).
PASSTHROUGH = (
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Resize", "Slice",
    "Split", "Identity", "Gather", "DepthToSpace", "SpaceToDepth", "Pad",
)
_SAME_RANGE_LAYERS = ("MaxPool", "Resize")
INT4_BLOCK = 32
EMBED_BLOCK = 32  # GatherBlockQuantized: blocks along each embedding row
# MatMulNBits computes in fp32 with accuracy_level 0; 4 quantises activations to int8 per block (faster, lossier).
INT4_ACCURACY_LEVEL = 0


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def gemm_as_matmul(node: onnx.NodeProto) -> str | None:
    """None if a Gemm is a plain ``A @ B(^T) + C`` (convertible to a MatMul kernel), else why not."""
    if _attr(node, "transA", 0):
        return "Gemm with transA"
    if abs(_attr(node, "alpha", 1.0) - 1.0) > 1e-7 or abs(_attr(node, "beta", 1.0) - 1.0) > 1e-7:
        return "Gemm with alpha/beta != 1"
    return None


def lower_qdq(
    model: onnx.ModelProto, layers: list[Layer], precisions: dict[str, str], ranges: dict[str, Range],
    hessians: dict[str, np.ndarray] | None = None, weight_bits: int | Mapping[str, int] = 8,
) -> onnx.ModelProto:
    """The model with each layer lowered at ``precisions[layer.name]`` (missing: fp32).

    ``ranges`` holds the calibrated [lo, hi] of every activation tensor a static
    int8 layer reads or writes; ``hessians`` (input tensor -> X^T X, ``compiler/gptq.py``) makes
    int4 MatMul weights GPTQ-rounded where their input has one (round-to-nearest otherwise).
    ``weight_bits``: the codes of int8 weights, for every layer or per layer name (missing: 8); 7 where
    the CPU's kernels saturate (targets/ort_cpu_isa.py, ort_cpu_saturation.py).
    """
    def bits(name: str) -> int:
        return weight_bits.get(name, 8) if isinstance(weight_bits, Mapping) else weight_bits

    ed = qdq.GraphEditor(model)
    index = GraphIndex.of(ed.model)
    nodes = {n.name: n for n in ed.graph.node}
    static = [lay for lay in layers if precisions.get(lay.name, FP32) == INT8 and lay.op != "Gather"]
    params = _static_params(ed.model, index, static, ranges)
    for tensor, (scale, zp) in params.items():
        qdq.add_activation_qdq(ed, tensor, scale, zp, "uint8")
    for lay in static:
        if lay.weights and lay.op != ACT_MATMUL:
            _static_weights(ed, lay, nodes[lay.nodes[0]], params, bits(lay.name))
    for lay in static:  # after the weights: removing nodes rebuilds the node list (``nodes`` goes stale)
        for name in lay.nodes:
            if nodes[name].op_type == "HardSwish":
                _hard_swish(ed, nodes[name])
    for lay in layers:
        p = precisions.get(lay.name, FP32)
        if lay.op == "Gather" and p in (INT8_WEIGHT, INT4_WEIGHT):
            node = nodes[lay.nodes[0]]
            qdq.replace_gather_block_quantized(ed, node, ed.weight(node.input[0]), 4 if p == INT4_WEIGHT else 8, EMBED_BLOCK)
        elif p == INT8_DYNAMIC:
            _dynamic(ed, lay, nodes[lay.nodes[0]], bits(lay.name))
        elif p == INT4_WEIGHT:
            _int4(ed, nodes[lay.nodes[0]], (hessians or {}).get(nodes[lay.nodes[0]].input[0]))
        elif p == FP16:
            _fp16_weights(ed, lay)
        elif p not in (FP32, INT8) or (p == INT8 and lay.op == "Gather"):
            raise InputError(f"layer {lay.name!r}: ort-cpu cannot lower precision {p!r}")
    return ed.finish()


def _static_params(model: onnx.ModelProto, index: GraphIndex, static: list[Layer], ranges: dict[str, Range]) -> dict[str, tuple]:
    """uint8 (scale, zero point) of every tensor to quantise, in graph order."""
    wanted: dict[str, Range] = {}
    for lay in static:
        names = list(lay.inputs) + [o for o in lay.outputs[:1] if o not in index.graph_outputs] + list(lay.internal)
        for t in names:
            if t in index.initializers:
                continue
            if t not in ranges:
                raise InputError(f"layer {lay.name!r}: no activation range for tensor {t!r} (calibration table lacks it)")
            wanted.setdefault(t, ranges[t])
    params = {t: qdq.affine_params(r.lo, r.hi, "uint8") for t, r in wanted.items()}
    same = {lay.nodes[0] for lay in static if lay.op in _SAME_RANGE_LAYERS}
    for node in model.graph.node:  # graph order: propagate through data movement
        if not node.input or node.input[0] not in params:
            continue
        if node.op_type in PASSTHROUGH and (node.op_type not in _SAME_RANGE_LAYERS or node.name in same):
            for out in node.output:
                if out not in index.graph_outputs:
                    params[out] = params[node.input[0]]
    return params


def _static_weights(ed: qdq.GraphEditor, lay: Layer, node: onnx.NodeProto, params: dict[str, tuple],
                    bits: int = 8) -> None:
    weight = node.input[1]
    w = ed.weight(weight)
    axis = qdq.channel_axis(node, w.ndim)
    dq, qw = qdq.add_weight_dq(ed, weight, axis % w.ndim, bits)
    ed.rewire(weight, dq, [node])
    if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2 and node.input[2] in ed.inits:
        bias = node.input[2]
        in_scale = params[lay.inputs[0]][0]
        if ed.weight(bias).ndim == 1 and ed.weight(bias).shape[0] == qw.scale.shape[0]:
            ed.rewire(bias, qdq.add_bias_dq(ed, bias, in_scale, qw.scale), [node])


def _hard_swish(ed: qdq.GraphEditor, node: onnx.NodeProto) -> None:
    """HardSwish(x) as Mul(x, relu6(x + 3) / 6) in QDQ form (its input already has its Q/DQ)."""
    x, step = node.input[0], 6.0 / 255
    three = ed.add_initializer(f"{node.name}_three_quantized", np.array(255, np.uint8))
    scales = {n: ed.add_initializer(f"{node.name}_{n}_scale", np.array(v, np.float32))
              for n, v in (("three", 3.0 / 255), ("relu6", step), ("hardsigmoid", step / 6))}
    zero = ed.add_initializer(f"{node.name}_zero_point", np.array(0, np.uint8))
    names = {n: ed.unique(f"{node.name}_{n}") for n in ("three", "sum", "relu6", "hardsigmoid")}
    ed.add_node("DequantizeLinear", [three, scales["three"], zero], [names["three"]], f"{node.name}_three_DequantizeLinear")
    ed.add_node("Add", [x, names["three"]], [names["sum"]], f"{node.name}_Add")
    ed.add_node("QuantizeLinear", [names["sum"], scales["relu6"], zero], [names["relu6"]], f"{node.name}_QuantizeLinear")
    ed.add_node("DequantizeLinear", [names["relu6"], scales["hardsigmoid"], zero], [names["hardsigmoid"]],
                f"{node.name}_DequantizeLinear")
    mul = ed.add_node("Mul", [x, names["hardsigmoid"]], list(node.output), f"{node.name}_Mul")
    ed.remove_nodes({node.name})
    mul.name = node.name  # profiles and plans name the layer by its node


def _matmul_weight(ed: qdq.GraphEditor, node: onnx.NodeProto) -> tuple[np.ndarray, str | None]:
    """([K, N] weight, bias name or None) of a MatMul or plain Gemm."""
    w = qdq.as_kn(node, ed.weight(node.input[1]))
    if node.op_type == "Gemm":
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias and (bias not in ed.inits or ed.weight(bias).ndim != 1):
            raise InputError(f"layer {node.name!r}: Gemm bias must be a 1-D constant for integer lowering")
        return w, bias
    return w, None


def _dynamic(ed: qdq.GraphEditor, lay: Layer, node: onnx.NodeProto, bits: int = 8) -> None:
    w, bias = _matmul_weight(ed, node)
    qdq.replace_dynamic_matmul(ed, node, w, bias, bits=bits)


def _int4(ed: qdq.GraphEditor, node: onnx.NodeProto, hessian: np.ndarray | None) -> None:
    w, bias = _matmul_weight(ed, node)
    packed = None if hessian is None else gptq.rounded(w, hessian, INT4_BLOCK)
    qdq.replace_matmul_nbits(ed, node, w, INT4_BLOCK, INT4_ACCURACY_LEVEL, bias, packed=packed)


def _fp16_weights(ed: qdq.GraphEditor, lay: Layer) -> None:
    """Weights stored as float16 and cast back at load: half the bytes, fp32 arithmetic."""
    for weight in lay.weights:
        key = ("fp16", weight)
        if key in ed.cache:
            continue
        half = ed.add_initializer(f"{weight}_fp16", ed.weight(weight).astype(np.float16))
        out = ed.unique(f"{weight}_fp32")
        ed.add_node("Cast", [half], [out], f"{weight}_Cast", to=onnx.TensorProto.FLOAT)
        ed.cache[key] = out
        ed.rewire(weight, out)


def check_layer(lay: Layer, precision: str, weights: dict[str, onnx.TensorProto], nodes: dict[str, onnx.NodeProto]) -> str | None:
    """Why ort-cpu cannot run ``lay`` at ``precision`` (None if it can)."""
    node = nodes.get(lay.nodes[0])
    if lay.op == "Gather":
        dims = list(weights[lay.weights[0]].dims) if lay.weights and lay.weights[0] in weights else []
        return None if len(dims) == 2 and dims[1] >= EMBED_BLOCK else f"{precision} needs rows of >= {EMBED_BLOCK} values"
    if precision not in (INT8_DYNAMIC, INT4_WEIGHT):
        return None
    if node is None or not lay.weights or lay.weights[0] not in weights:
        return f"{precision} needs a constant weight"
    if node.op_type == "Gemm" and (why := gemm_as_matmul(node)):
        return f"{precision}: {why}"
    dims = list(weights[lay.weights[0]].dims)
    if len(dims) != 2:
        return f"{precision} needs a 2-D weight (this one is {len(dims)}-D)"
    k = dims[1] if node.op_type == "Gemm" and _attr(node, "transB", 0) else dims[0]
    if precision == INT4_WEIGHT and k < INT4_BLOCK:
        return f"int4 blocks of {INT4_BLOCK} need K >= {INT4_BLOCK} (K = {k})"
    return None


def initializer_bytes(t: onnx.TensorProto) -> int:
    return numpy_helper.to_array(t).nbytes
