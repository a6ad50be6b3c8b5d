"""The plan this target lowers when no DMPQ plan is given, and the target's precision menu.

With a calibration table and no plan: INT8 wherever the menu allows it and TensorRT has a fast
INT8 kernel for the layer (Model Optimizer's small-channel and small-GEMM rules, as data in
rules/tensorrt_qdq.toml), FP16 elsewhere. With neither: FP16 layers (TensorRT strongly typed
builds run exactly the precisions in the graph, so FP16 has to be written into it).
"""

from __future__ import annotations

from onnx import numpy_helper

from dscompile.calibration.table import CalibrationTable
from dscompile.compiler.capabilities import (
    DEFAULT_NUMERICS,
    FP16,
    FP32,
    INT4_WEIGHT,
    INT8,
    Layer,
    Numerics,
    PrecisionMenu,
)
from dscompile.compiler.graph import ModelGraph, static_shapes
from dscompile.compiler.layers import ACT_MATMUL, GraphIndex, find_layers, layer_weight
from dscompile.compiler.plan import LayerPlan, QuantPlan
from dscompile.targets.tensorrt_rules import _attr, conv_int8_unfit, gemm_int8_unfit

_GEMM = (FP32, FP16, INT8, INT4_WEIGHT)
_Q = (FP32, FP16, INT8)
MENU = PrecisionMenu(
    by_op={
        "Conv": _Q, "ConvTranspose": _Q, "MatMul": _GEMM, "Gemm": _GEMM, ACT_MATMUL: _Q,
        # Element-wise and pooling ops TensorRT fuses with Q/DQ (residual Add, Concat, pooling).
        "Add": _Q, "Concat": _Q, "MaxPool": _Q, "AveragePool": _Q, "GlobalAveragePool": _Q,
        "If": (FP32,), "Loop": (FP32,), "Scan": (FP32,),
    },
    default=(FP32, FP16),
)
# What each precision does to a layer here, for DMPQ's emulator: an INT8 layer quantizes its inputs
# (Q/DQ in front) and writes float; only the next INT8 layer's Q/DQ requantizes (tensorrt_qdq.py).
NUMERICS = {**DEFAULT_NUMERICS, INT8: Numerics("int8_channel", "static", quantize_output=False)}
# INT8 on these only where a quantized neighbour makes TensorRT fuse them (placement decides).
_INT8_BY_DEFAULT = ("Conv", "ConvTranspose", "MatMul", "Gemm", ACT_MATMUL, "Add", "Concat", "MaxPool", "AveragePool",
                    "GlobalAveragePool")


def int8_unfit(layer: Layer, graph: ModelGraph, index: GraphIndex, shapes: dict) -> str:
    """Why TensorRT would run this layer slower in INT8 than in FP16 ('' if it would not)."""
    anchor = next(n for n in graph.model.graph.node if n.name == layer.nodes[0])
    if layer.op == "Conv" and (w := layer_weight(layer)) and w in index.initializers:
        shape = tuple(numpy_helper.to_array(index.initializers[w]).shape)
        first = anchor.input[0] in {i.name for i in graph.model.graph.input}
        if len(shape) >= 3 and conv_int8_unfit(shape, _attr(anchor, "group", 1), first):
            return f"{shape[1]}->{shape[0]} channel conv has no fast INT8 kernel on TensorRT (rule int8_conv_small_channels)"
    if layer.op in ("MatMul", "Gemm", ACT_MATMUL):
        detail = gemm_int8_unfit(anchor, shapes)
        if detail:
            return f"GEMM {detail} has no INT8 Tensor Core kernel on TensorRT (rule int8_gemm_small)"
    return ""


_FUSED_ONLY = ("Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool")
LAYOUT_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")  # move data, keep every value
# Ops TensorRT moves Q/DQ across (layout, slicing, nearest resize) or runs in INT8 beside a Q/DQ (the ops above)
_PASS_THROUGH = (*LAYOUT_OPS, "Split", "Slice", "Identity", "Resize", *_FUSED_ONLY)
_GEMM_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def int8_output_unfit(layer: Layer, index: GraphIndex, gemm_outputs: frozenset[str] = frozenset()) -> str:
    """Why an Add/Concat/pool gains nothing from INT8 ('' otherwise). TensorRT runs such an op in INT8 to keep
    the tensor INT8 up to the conv or GEMM that reads it; where no Conv/Gemm/MatMul reads its output (through
    layout ops and other such ops), its Q/DQ only rounds, and a Concat's one shared scale rounds its small-range
    inputs hardest (Model Optimizer leaves these float). A model output: YOLOv8's output Concat joins boxes
    (0..320) and class scores (0..1), INT8 zeroes every score. YOLOv8's per-scale head Concats join 64 box-
    distance logits and the class logits and go to Reshape -> Softmax / Sigmoid: in INT8 they cost top-10 box
    IoU 0.892 -> 0.925 against FP32 (nudenet YOLOv8n-320, 32 held-out photos), and with its box-decode Add
    (x1y1 + x2y2 in pixels, both inputs quantized) float too, 0.939. An Add reading the output of a weighted
    layer (``gemm_outputs``, through layout ops) is a residual Add TensorRT fuses into that layer's epilogue
    (a transformer's residual before LayerNorm): it keeps INT8."""
    if layer.op not in _FUSED_ONLY:
        return ""
    if index.graph_outputs.intersection(layer.outputs):
        return f"{layer.op} writes the model output {layer.outputs[0]!r}: no INT8 layer follows to fuse with"
    if layer.op == "Add" and any(_through_layout(index, t) in gemm_outputs for t in layer.inputs):
        return ""
    seen: set[str] = set()
    todo = list(layer.outputs)
    while todo:
        for node in index.consumers.get(todo.pop(), []):
            if node.op_type in _GEMM_OPS:
                return ""
            if node.op_type in _PASS_THROUGH and node.name not in seen:
                seen.add(node.name)
                todo.extend(node.output)
    return f"{layer.op} output {layer.outputs[0]!r} reaches no Conv/Gemm/MatMul: INT8 would only round it"


def _through_layout(index: GraphIndex, tensor: str) -> str:
    """The tensor a chain of layout-only ops and bias Adds (one constant input) starts from."""
    for _ in range(4):
        p = index.producer.get(tensor)
        if p is not None and p.op_type == "Add" and len(p.input) == 2 and sum(map(index.is_constant, p.input)) == 1:
            tensor = next(i for i in p.input if not index.is_constant(i))
            continue
        if p is None or p.op_type not in LAYOUT_OPS:
            break
        tensor = p.input[0]
    return tensor


def gemm_outputs(layers: list[Layer]) -> frozenset[str]:
    """Outputs of weighted layers (what a residual Add fuses with)."""
    return frozenset(o for lay in layers if lay.weights for o in lay.outputs)


def reference_precision(layer: Layer, menu: tuple[str, ...]) -> str:
    """What this target's conventional placement gives a layer (as Model Optimizer places INT8 for
    TensorRT): INT8 where the menu (after the rule checker's verdicts) keeps it, FP16 elsewhere."""
    if INT8 in menu and layer.op in _INT8_BY_DEFAULT:
        return INT8
    return FP16 if FP16 in menu else FP32


def default_plan(graph: ModelGraph, table: CalibrationTable | None, target: str, device: str) -> QuantPlan:
    index = GraphIndex.of(graph.model)
    shapes = static_shapes(graph.model)
    layers = []
    found = find_layers(graph)
    fused = gemm_outputs(found)
    for layer in found:
        precision, reason = _choose(layer, graph, table, index, shapes, fused)
        layers.append(LayerPlan(layer.name, layer.nodes, layer.op, precision, layer.module, reason=reason))
    how = "calibrated INT8 where TensorRT has INT8 kernels" if table else "FP16 (no calibration data)"
    return QuantPlan(target, graph.sha256, tuple(layers), budget={"default": how}, device=device)


def _choose(layer: Layer, graph: ModelGraph, table: CalibrationTable | None, index: GraphIndex, shapes: dict,
            fused: frozenset[str]) -> tuple[str, str]:
    menu = MENU.for_op(layer.op)
    fallback = FP16 if FP16 in menu else FP32
    if table is None:
        return fallback, "no calibration data and no plan: FP16 where the menu allows"
    if INT8 not in menu or layer.op not in _INT8_BY_DEFAULT:
        return FP32, "no plan: left as it is (TensorRT fuses Q/DQ into the layers around it)"
    missing = [t for t in layer.inputs if t not in table.tensors]
    if missing:
        return fallback, f"no calibration range for {missing[0]!r}"
    why = int8_unfit(layer, graph, index, shapes) or int8_output_unfit(layer, index, fused)
    if why:
        return fallback, why
    return INT8, "no plan: calibrated INT8"
