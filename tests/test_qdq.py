"""QDQ primitives and the ort-cpu placement: numbers right, and onnxruntime runs integer kernels."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dscompile.compiler import qdq
from dscompile.compiler.graph import ModelGraph, SourceInfo, graph_inputs, graph_outputs
from dscompile.compiler.layers import find_layers
from dscompile.compiler.normalize import normalize
from dscompile.targets.ort_cpu_isa import int8_weight_bits
from dscompile.targets.ort_cpu_qdq import Range, lower_qdq

BITS = int8_weight_bits(this_cpu=True)

RNG = np.random.default_rng(0)


def _matmul_model(k: int, n: int, w: np.ndarray, opset: int = 17) -> onnx.ModelProto:
    g = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_per_channel_symmetric_error_is_half_a_step():
    w = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32)
    qw = qdq.symmetric_per_channel(w, axis=0)
    assert qw.q.dtype == np.int8 and qw.scale.shape == (8,)
    err = np.abs(qw.dequantize() - w).reshape(8, -1).max(1)
    assert np.all(err <= qw.scale / 2 + 1e-7)
    assert np.all(np.abs(qw.q).reshape(8, -1).max(1) == 127)  # the full range is used per channel


def test_affine_params_keep_zero_exact_and_cover_the_range():
    scale, zp = qdq.affine_params(-0.7, 5.3, "uint8")
    assert 0 <= zp <= 255
    assert qdq.fake_quantize(np.array([0.0], np.float32), scale, zp)[0] == 0.0
    assert abs(qdq.fake_quantize(np.array([5.3], np.float32), scale, zp)[0] - 5.3) <= scale
    assert qdq.affine_params(0.0, 6.0)[1] == 0  # after a ReLU: zero point 0, so Relu folds away


@pytest.mark.parametrize("symmetric", [False, True])
def test_matmul_nbits_matches_its_emulation(symmetric):
    k, n = 96, 40
    w = RNG.standard_normal((k, n)).astype(np.float32)
    a = RNG.standard_normal((3, k)).astype(np.float32)
    ed = qdq.GraphEditor(_matmul_model(k, n, w))
    qdq.replace_matmul_nbits(ed, ed.graph.node[0], w, 32, symmetric=symmetric)
    model = ed.finish()
    assert [nd.op_type for nd in model.graph.node] == ["MatMulNBits"]
    y = _run(model, {"a": a})[0]
    emulated = a @ qdq.block_int4(w, 32, symmetric).dequantize()
    np.testing.assert_allclose(y, emulated, atol=1e-4)
    assert np.abs(y - a @ w).max() / np.abs(a @ w).max() < 0.15  # 4 bits: close, not exact


def test_dequantize_linear_21_int4_blocks_round_trip():
    w = RNG.standard_normal((96, 40)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"], name="i")], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [96, 40])], [numpy_helper.from_array(w, "w")])
    ed = qdq.GraphEditor(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))
    out, qw = qdq.add_weight_dq_int4_block(ed, "w", 32, axis=0)
    ed.rewire("w", out, [ed.graph.node[0]])
    model = ed.finish(21)
    q_init = next(t for t in model.graph.initializer if t.data_type == TensorProto.INT4)
    assert list(q_init.dims) == [96, 40]
    np.testing.assert_array_equal(_run(model, {})[0], qw.dequantize())
    assert np.abs(qw.dequantize() - w).max() <= np.abs(w).max() / 7
    # the grid DMPQ's emulator rounds to (block_int4, symmetric): what it measured is what is built
    np.testing.assert_allclose(qw.dequantize(), qdq.block_int4(w, 32, symmetric=True).dequantize(), rtol=1e-6, atol=1e-7)


def _dynamic_error(bits: int, positive: bool = False) -> float:
    """Error of a DynamicQuantizeMatMul; ``positive``: inputs and weights near their maxima, so neighbouring
    uint8 x int8 products are both large (what an int16 pair sum cannot hold at 8 bits)."""
    rng = np.random.default_rng(0)
    draw = (lambda shape: rng.uniform(0.5, 1.0, shape)) if positive else rng.standard_normal
    w = draw((64, 16)).astype(np.float32)
    a = draw((3, 64)).astype(np.float32)
    ed = qdq.GraphEditor(_matmul_model(64, 16, w))
    qdq.replace_dynamic_matmul(ed, ed.graph.node[0], w, bits=bits)
    y = _run(ed.finish(), {"a": a})[0]
    return float(np.abs(y - a @ w).max() / np.abs(a @ w).max())


def test_dynamic_matmul_is_close():
    """At the weight bits chosen for this CPU (7 on x86 without VNNI, else 8) onnxruntime computes it exactly."""
    assert _dynamic_error(BITS) < 0.02 and _dynamic_error(BITS, positive=True) < 0.02


@pytest.mark.skipif(BITS == 8, reason="this CPU accumulates uint8 x int8 without saturating (VNNI or Arm)")
def test_full_range_weights_saturate_where_reduce_range_is_chosen():
    """Why 7 bits here: onnxruntime's uint8 x int8 kernel (vpmaddubsw, no VNNI) clips int16 pair sums."""
    assert _dynamic_error(8, positive=True) > 0.1 > 0.01 > _dynamic_error(7, positive=True)


def test_shared_weight_is_quantised_once():
    w = RNG.standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["a", "w"], ["h"], name="m1"), helper.make_node("MatMul", ["h", "w"], ["y"], name="m2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    graph = ModelGraph(model, graph_inputs(model), graph_outputs(model), SourceInfo("m", "0", "onnx"))
    layers = find_layers(graph)
    q = lower_qdq(model, layers, {lay.name: "int8" for lay in layers}, {"a": Range(-3, 3), "h": Range(-20, 20)})
    assert sum(1 for t in q.graph.initializer if t.data_type == TensorProto.INT8 and list(t.dims) == [8, 8]) == 1
    a = RNG.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(q, {"a": a})[0], a @ w @ w, atol=0.6)


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> Counter:
    """Op census of the graph onnxruntime actually runs, with default session options."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def _zoo_lowered(zoo, precision_of, model: onnx.ModelProto | None = None) -> tuple[onnx.ModelProto, onnx.ModelProto, list]:
    from dscompile.calibration.collect import calibrate

    model = normalize(model or onnx.load(str(zoo.onnx)))
    graph = ModelGraph(model, graph_inputs(model), graph_outputs(model), SourceInfo("m", "0", "onnx"))
    layers = find_layers(graph)
    name = graph.inputs[0].name
    feeds = [{name: zoo.calib[i : i + 1]} for i in range(64)]
    tensors = sorted({t for lay in layers for t in (*lay.inputs, *lay.outputs, *lay.internal)} - {i.name for i in model.graph.initializer})
    table = calibrate(model, feeds, model_sha256="m", data_sha256="d", tensors=tensors, progress=False)
    ranges = {t: Range(r.min, r.max) for t, r in table.tensors.items()}
    precisions = {lay.name: precision_of(lay) for lay in layers}
    lowered = lower_qdq(model, layers, {k: v for k, v in precisions.items() if v}, ranges, weight_bits=BITS)
    return model, lowered, feeds


def test_cnn_int8_runs_on_integer_kernels(digits, tmp_path):
    model, q, _ = _zoo_lowered(digits, lambda lay: "int8")
    ops = _optimized_ops(q, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 2, ops
    assert not {"Conv", "FusedConv", "Gemm", "FusedGemm", "DequantizeLinear"} & set(ops), ops
    x = digits.test_x[:200]
    ref = np.concatenate([_run(model, {"x": x[i : i + 1]})[0] for i in range(len(x))])
    got = np.concatenate([_run(q, {"x": x[i : i + 1]})[0] for i in range(len(x))])
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.99


def test_hardswish_stays_on_integers(digits, tmp_path):
    """Conv + HardSwish is one layer; at int8 the HardSwish runs as QLinearAdd + QLinearMul, not in float."""
    model = onnx.load(str(digits.onnx))
    for node in model.graph.node:  # the digits CNN with its ReLUs turned into HardSwish
        if node.op_type == "Relu":
            node.op_type = "HardSwish"
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = max(imp.version, 14)
    ref_model, q, _ = _zoo_lowered(digits, lambda lay: "int8", model)
    graph = ModelGraph(ref_model, graph_inputs(ref_model), graph_outputs(ref_model), SourceInfo("m", "0", "onnx"))
    fused = [lay for lay in find_layers(graph) if lay.internal]
    assert any(lay.op == "Conv" for lay in fused), fused
    ops = _optimized_ops(q, tmp_path)
    assert ops["QLinearAdd"] >= len(fused) and ops["QLinearMul"] >= len(fused), ops
    assert not {"HardSwish", "HardSigmoid", "DequantizeLinear"} & set(ops), ops
    x = digits.test_x[:200]
    ref = np.concatenate([_run(ref_model, {"x": x[i : i + 1]})[0] for i in range(len(x))])
    got = np.concatenate([_run(q, {"x": x[i : i + 1]})[0] for i in range(len(x))])
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.98


def test_transformer_precisions_hit_integer_kernels(transformer, tmp_path):
    _, q, _ = _zoo_lowered(transformer, lambda lay: "int8" if lay.op != "Gather" else "int4_weight")
    ops = _optimized_ops(q, tmp_path)
    assert ops["GatherBlockQuantized"] == 1, ops  # the token embedding, 4-bit
    assert ops["QGemm"] >= 8 and ops["QLinearMatMul"] >= 2, ops
    _, qd, _ = _zoo_lowered(transformer, lambda lay: "int8_dynamic" if lay.op in ("Gemm", "MatMul") else None)
    assert _optimized_ops(qd, tmp_path)["DynamicQuantizeMatMul"] == 9
    _, q4, _ = _zoo_lowered(transformer, lambda lay: "int4_weight" if lay.op in ("Gemm", "MatMul") and lay.params >= 1024 else None)
    assert _optimized_ops(q4, tmp_path)["MatMulNBits"] == 8
