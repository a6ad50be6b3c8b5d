"""How jetson-orin verifies numerics on onnxruntime: Q/DQ as TensorRT computes it (no integer-kernel
saturation), graphs at opset 21 run, FP16 rounding kept."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from dscompile.compiler.fp16_emulate import emulate_fp16, has_fp16
from dscompile.targets.ort_cpu_isa import int8_weight_bits
from dscompile.targets.tensorrt import TensorRTRunner


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


def test_opset21_qdq_runs_in_the_verification_session(tmp_path):
    """At opset 21 onnxruntime's QDQ propagation writes output_dtype=INT8 on the Q it inserts and the x86
    S8->U8 pass flips its zero point (session creation fails); the runner's session, with the QDQ
    transformers off, runs it with the unoptimized numbers and the other optimizations on."""
    model = _qdq_maxpool(21)
    x = np.random.default_rng(0).normal(size=(1, 2, 4, 4)).astype(np.float32)
    plain = _session(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})[0]
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    runner = TensorRTRunner(path, threads=1)
    assert runner.session.get_session_options().graph_optimization_level != ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    np.testing.assert_array_equal(runner.run({"x": x})[0], plain)


def _large_conv() -> tuple[onnx.ModelProto, np.ndarray, float]:
    """Q/DQ input -> Conv (int8 per-channel weights, float bias) -> Q/DQ output, as the jetson-orin lowering
    writes an INT8 layer followed by another: inputs near their amax and weights near their channel max,
    all positive, so neighbouring products are both large (what an int16 pair sum cannot hold)."""
    rng = np.random.default_rng(0)
    cin, cout = 16, 8
    x = rng.uniform(0.5, 1.0, (1, cin, 8, 8)).astype(np.float32)
    w = rng.uniform(0.5, 1.0, (cout, cin, 3, 3)).astype(np.float32)
    ws = (np.abs(w).reshape(cout, -1).max(1) / 127).astype(np.float32)
    sy = np.float32(cin * 9 / 127)
    inits = [nh.from_array(np.array(1 / 127, np.float32), "sx"), nh.from_array(np.array(0, np.int8), "z"),
             nh.from_array(np.round(w / ws[:, None, None, None]).astype(np.int8), "wq"), nh.from_array(ws, "ws"),
             nh.from_array(np.zeros(cout, np.int8), "wz"), nh.from_array(np.full(cout, 0.1, np.float32), "b"),
             nh.from_array(np.array(sy), "sy")]
    nodes = [h.make_node("QuantizeLinear", ["x", "sx", "z"], ["xq"]), h.make_node("DequantizeLinear", ["xq", "sx", "z"], ["xd"]),
             h.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             h.make_node("Conv", ["xd", "wd", "b"], ["c"], pads=[1, 1, 1, 1]),
             h.make_node("QuantizeLinear", ["c", "sy", "z"], ["cq"]), h.make_node("DequantizeLinear", ["cq", "sy", "z"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, cin, 8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, cout, 8, 8])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), x, float(sy)


def test_runner_computes_qdq_as_tensorrt_does(tmp_path):
    """TensorRT accumulates int8 x int8 in int32: the result is the Q/DQ graph's float arithmetic up to
    rounding. The runner must compute that on any CPU; with onnxruntime's QDQ fusion on (the old
    runner), an x86 CPU without VNNI saturated int16 pair sums and this conv was off by 57 %."""
    model, x, step = _large_conv()
    exact = _session(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})[0]
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    got = TensorRTRunner(path, threads=1).run({"x": x})[0]
    assert np.abs(got - exact).max() <= step + 1e-6  # at most one output code apart (float summation order)


@pytest.mark.skipif(int8_weight_bits(this_cpu=True) == 8, reason="this CPU accumulates uint8 x int8 without "
                    "saturating (VNNI or Arm): onnxruntime's fused kernels are exact here")
def test_fused_integer_kernels_saturate_on_this_cpu():
    """Why the runner turns QDQ fusion off: here (x86 without VNNI) onnxruntime's default session runs the
    same graph on vpmaddubsw kernels and clips."""
    model, x, _ = _large_conv()
    exact = _session(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})[0]
    fused = _session(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ("QDQPropagationTransformer",)).run(None, {"x": x})[0]
    assert np.abs(fused - exact).max() / np.abs(exact).max() > 0.1


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


def test_fp16_rounding_survives_the_runner(tmp_path):
    model = _fp16_chain()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    x = np.array([[1.0001, 3.14159265, 0.3333333, 2.7182818]], np.float32)
    w = nh.to_array(model.graph.initializer[0]).astype(np.float32)
    want = np.maximum((x.astype(np.float16).astype(np.float32) @ w).astype(np.float16), 0).astype(np.float32)
    got = TensorRTRunner(path, threads=1).run({"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3)
    assert np.abs(got - np.maximum(x @ w, 0)).max() > 1e-3  # the rounding is there


def test_emulation_keeps_models_without_fp16_and_checks():
    model = _qdq_maxpool(21)
    assert not has_fp16(model) and emulate_fp16(model) is model
    emulated = emulate_fp16(_fp16_chain())
    onnx.checker.check_model(emulated, full_check=True)
    assert not any(t.data_type == T.FLOAT16 for t in emulated.graph.initializer)
    assert [vi.name for vi in emulated.graph.output] == ["y"]
