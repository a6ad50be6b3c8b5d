"""How jetson-orin verifies numerics on onnxruntime: default optimizations that run at opset 21, FP16 rounding kept."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from dscompile.compiler.fp16_emulate import emulate_fp16, has_fp16
from dscompile.targets.tensorrt import ORT_SKIPPED_OPTIMIZERS, TensorRTRunner


def _qdq_maxpool(opset: int) -> onnx.ModelProto:
    """Q/DQ -> MaxPool: onnxruntime's QDQ propagation copies the Q/DQ past the MaxPool."""
    inits = [nh.from_array(np.array(0.05, np.float32), "s"), nh.from_array(np.array(0, np.int8), "z")]
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             h.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             h.make_node("MaxPool", ["xd"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 2, 4, 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 2, 2, 2])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)])


def _session(model: onnx.ModelProto, level, disabled=()) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled))


def test_opset21_qdq_runs_with_default_optimizations(tmp_path):
    """At opset 21 the propagated Q gets output_dtype=INT8 and the x86 S8->U8 pass flips its zero point;
    skipping only the propagation lets every other optimization run, with the unoptimized numbers."""
    model = _qdq_maxpool(21)
    x = np.random.default_rng(0).normal(size=(1, 2, 4, 4)).astype(np.float32)
    plain = _session(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})[0]
    ours = _session(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ORT_SKIPPED_OPTIMIZERS).run(None, {"x": x})[0]
    np.testing.assert_array_equal(ours, plain)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    runner = TensorRTRunner(path, threads=1)
    assert runner.session.get_session_options().graph_optimization_level != ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    np.testing.assert_array_equal(runner.run({"x": x})[0], plain)
    assert "QDQPropagationTransformer" in runner.where()


def _fp16_chain() -> onnx.ModelProto:
    """Cast to FP16 -> MatMul (FP16 weight) -> Relu -> Cast back: an FP16 layer as the lowering writes it."""
    w = nh.from_array((np.arange(16, dtype=np.float32).reshape(4, 4) / 7.0).astype(np.float16), "w")
    nodes = [h.make_node("Cast", ["x"], ["x16"], to=T.FLOAT16), h.make_node("MatMul", ["x16", "w"], ["m"]),
             h.make_node("Relu", ["m"], ["r"]), h.make_node("Cast", ["r"], ["y"], to=T.FLOAT)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 4])], [w])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("level", ["ORT_DISABLE_ALL", "ORT_ENABLE_ALL"])
def test_fp16_rounding_survives_onnxruntime_cpu(level):
    model = _fp16_chain()
    x = np.array([[1.0001, 3.14159265, 0.3333333, 2.7182818]], np.float32)
    w = nh.to_array(model.graph.initializer[0]).astype(np.float32)
    want = np.maximum((x.astype(np.float16).astype(np.float32) @ w).astype(np.float16), 0).astype(np.float32)
    exact = np.maximum(x @ w, 0)
    lvl = getattr(ort.GraphOptimizationLevel, level)
    plain = _session(model, lvl).run(None, {"x": x})[0]
    emulated = _session(emulate_fp16(model), lvl).run(None, {"x": x})[0]
    # onnxruntime's CPU runs the isolated FP16 nodes in FP32 and drops the Casts: no rounding at all
    assert np.abs(plain - want).max() > 1e-3 and np.allclose(plain, exact, rtol=1e-6)
    np.testing.assert_allclose(emulated, want, rtol=1e-3)
    assert np.abs(emulated - want).max() < np.abs(plain - want).max() / 10


def test_emulation_keeps_models_without_fp16_and_checks():
    model = _qdq_maxpool(21)
    assert not has_fp16(model) and emulate_fp16(model) is model
    emulated = emulate_fp16(_fp16_chain())
    onnx.checker.check_model(emulated, full_check=True)
    assert not any(t.data_type == T.FLOAT16 for t in emulated.graph.initializer)
    assert [vi.name for vi in emulated.graph.output] == ["y"]
