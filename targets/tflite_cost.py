"""Snapdragon cost model: the roofline of the device profile, with HTP fallbacks penalised.

A layer the QNN delegate keeps on the HTP costs what ``profiles.estimate.layer_cost``
says for its precision. A layer it cannot keep there (an op outside the QNN
op list, a hybrid dynamic-range kernel, float on an HTP without FP16) runs
in float off the NPU, and splits the delegated graph: it costs its fp32
estimate plus two delegate boundaries (leaving the NPU and coming back), each
priced at the profile class's per-invocation overhead. So DMPQ, minimising
latency, prefers allocations that keep the graph on the NPU; under a size budget,
where latency only breaks ties, ``off_device`` tells DMPQ which options leave the
NPU, and it ranks them below every NPU-resident option of their layer.

Bytes are what the .tflite holds for the layer at that precision (``tflite_bytes``),
not just its weight at the precision's width: the bias (int32 under int8, int64
under int16x8, float otherwise), and a float32 scale plus an int64 zero point per
output channel for every per-channel quantized tensor (weight and bias), which is
how ai-edge-quantizer writes them.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from dscompile.compiler.capabilities import (
    FP16,
    FP32,
    INT4_WEIGHT,
    INT8,
    INT8_DYNAMIC,
    INT8_WEIGHT,
    INT16X8,
    Cost,
    Layer,
)
from dscompile.profiles.devices import DeviceProfile
from dscompile.profiles.estimate import efficiency_for, layer_cost
from dscompile.targets.tflite_compat import QnnRules, htp_has_fp16, layer_runs_on_htp, load_rules

# Bytes per element of a layer's main weight and of its bias in the .tflite, per precision.
_WEIGHT_BYTES = {FP32: 4.0, FP16: 2.0, INT8: 1.0, INT16X8: 1.0, INT8_DYNAMIC: 1.0, INT8_WEIGHT: 1.0, INT4_WEIGHT: 0.5}
_BIAS_BYTES = {INT8: 4, INT16X8: 8}  # integer biases of static kernels; the rest keep a float32 bias
# Per output channel of a per-channel quantized tensor: a float32 scale and an int64 zero point.
_QPARAM_BYTES = 12
# Flatbuffer structure (tensor tables and names, op tables, signature, metadata), measured on
# onnx2tf 1.29 + ai-edge-quantizer 0.10 files: about 220 B per ONNX node plus 1 kB per model,
# and about 200 B more per layer lowered to a non-float precision (activation scales, a
# QUANTIZE/DEQUANTIZE op). tests/test_tflite_size.py holds the prediction to the real file.
_STRUCTURE_BASE, _STRUCTURE_PER_NODE, _STRUCTURE_PER_QUANTIZED_LAYER = 1000, 220, 200


def structure_bytes(model: onnx.ModelProto) -> int:
    """Estimated bytes of a float .tflite that are not constants (see _STRUCTURE_BASE)."""
    return _STRUCTURE_BASE + _STRUCTURE_PER_NODE * len(model.graph.node)


def weight_channels(model: onnx.ModelProto) -> dict[str, int]:
    """Output channels (the per-channel quantization axis) of every weight of a Conv/Gemm/MatMul."""
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    out: dict[str, int] = {}
    for node in model.graph.node:
        w = dims.get(node.input[1], ()) if len(node.input) > 1 else ()
        if len(w) < 2:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            out[node.input[1]] = w[0]  # [out, in/group, ...]
        elif node.op_type == "ConvTranspose":
            out[node.input[1]] = w[1] * attrs.get("group", 1)  # [in, out/group, ...]
        elif node.op_type == "Gemm":
            out[node.input[1]] = w[0] if attrs.get("transB", 0) else w[1]
        elif node.op_type == "MatMul":
            out[node.input[1]] = w[-1]
    return out


def tflite_bytes(layer: Layer, precision: str, channels_of: Mapping[str, int]) -> int:
    """Bytes a layer's constants take in the .tflite at ``precision`` (weight, bias, scales)."""
    if layer.op == "Gather":  # a GATHER table: one per-tensor tensor at the activation width (targets/tflite.py MENU)
        width = {INT8: 1, INT16X8: 2}.get(precision, 4)
        return layer.params * width + (_STRUCTURE_PER_QUANTIZED_LAYER + _QPARAM_BYTES if width < 4 else 0)
    channels = channels_of.get(layer.weights[0], 0) if layer.weights else 0
    # TensorFlow's converter gives every convolution a bias (zeros when the source has none);
    # a fully-connected layer has one when the source has a bias (or a folded BatchNorm).
    bias = channels if layer.op in ("Conv", "ConvTranspose") or len(layer.weights) > 1 else 0
    quantized = precision not in (FP32, FP16)
    total = layer.params * _WEIGHT_BYTES.get(precision, 4.0) + bias * _BIAS_BYTES.get(precision, 4)
    if precision != FP32:
        total += _STRUCTURE_PER_QUANTIZED_LAYER
    if quantized:
        total += channels * _QPARAM_BYTES * (2 if precision in _BIAS_BYTES and bias else 1)
    return int(round(total))


class SnapdragonCost:
    """Estimated bytes and latency of a layer at a precision on one Snapdragon profile."""

    def __init__(self, profile: DeviceProfile, rules: QnnRules | None = None,
                 channels: Mapping[str, int] | None = None, structure: int = 0) -> None:
        self.profile = profile
        self.channels = channels or {}  # weight -> output channels, from weight_channels(graph)
        self.structure = structure  # the file's bytes that are no constant, from structure_bytes(graph)
        self.rules = rules or load_rules()
        self.htp_fp16 = htp_has_fp16(profile)
        self.boundary_ms = efficiency_for(profile).model_overhead_us * 1e-3

    def on_htp(self, layer: Layer, precision: str) -> tuple[bool, str]:
        return layer_runs_on_htp(self.rules, layer.op, precision, self.htp_fp16)

    def off_device(self, layer: Layer, precision: str) -> str:
        """Why ``layer`` at ``precision`` would leave the Hexagon NPU ("" when it stays): DMPQ ranks
        such options below the layer's NPU-resident ones under a size budget (compiler/dmpq.py)."""
        ok, why = self.on_htp(layer, precision)
        return "" if ok else why or "off the HTP"

    def cost(self, layer: Layer, precision: str) -> Cost:
        base = layer_cost(self.profile, layer, precision)
        if layer.weights:
            base = Cost(tflite_bytes(layer, precision, self.channels), base.latency_ms, base.kind, base.source)
        ok, why = self.on_htp(layer, precision)
        if ok:
            return base
        off = layer_cost(self.profile, layer, FP32)
        return Cost(
            base.bytes, off.latency_ms + 2 * self.boundary_ms, "estimated",
            f"{base.source}; off the HTP ({why}): fp32 estimate + 2 delegate boundaries",
        )

    def overhead_bytes(self) -> int:
        """Bytes of the file that belong to no layer's constants (DMPQ adds them to its size total)."""
        return self.structure

    def overhead_ms(self) -> float:
        return efficiency_for(self.profile).model_overhead_us * 1e-3
