"""TensorRT rule checker findings, INT4 weight-only lowering, and the bad inputs of the jetson-orin target."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dscompile.compiler.graph import static_shapes
from dscompile.targets.tensorrt_rules import check_model
from dscompile.targets.tensorrt_versions import release_for_jetpack

JP62, JP512 = release_for_jetpack("6.2"), release_for_jetpack("5.1.2")


def _model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def _rules(model, release=JP62):
    return {(f.node, f.rule): f for f in check_model(model, release, static_shapes(model)).findings}


def test_unsupported_op_names_node_and_fallback():
    m = _model([helper.make_node("Unique", ["x"], ["y"], name="dedupe")], [_vi("x", [8])], [_vi("y", ["n"])])
    f = _rules(m)[("dedupe", "op_support")]
    assert f.severity == "error" and f.op == "Unique" and "fallback" in f.fallback
    assert "onnx-tensorrt" in f.source


def test_layernorm_depends_on_the_jetpack():
    m = _model([helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], name="ln")],
               [_vi("x", [2, 4])], [_vi("y", [2, 4])],
               [numpy_helper.from_array(np.ones(4, np.float32), "s"), numpy_helper.from_array(np.zeros(4, np.float32), "b")])
    assert ("ln", "op_support") in _rules(m, JP512)  # TensorRT 8.5's parser has no LayerNormalization
    assert ("ln", "op_support") not in _rules(m, JP62)
    assert "opset 16" in _rules(m, JP512)[("ln", "op_support")].fallback


def test_asymmetric_uint8_qdq_is_rejected():
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q_x"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq_x")]
    found = _rules(_model(nodes, [_vi("x", [4])], [_vi("y", [4])], inits))
    assert found[("q_x", "qdq_type")].severity == "error"
    assert found[("q_x", "qdq_zero_point")].severity == "error"


def test_per_channel_activation_and_int32_bias_are_rejected():
    inits = [numpy_helper.from_array(np.full(4, 0.1, np.float32), "s"), numpy_helper.from_array(np.zeros(4, np.int8), "z"),
             numpy_helper.from_array(np.arange(4, dtype=np.int32), "b"), numpy_helper.from_array(np.ones(4, np.float32), "bs"),
             numpy_helper.from_array(np.zeros(4, np.int32), "bz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q_act", axis=1),
             helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bias"], name="dq_bias", axis=0)]
    found = _rules(_model(nodes, [_vi("x", [1, 4])], [_vi("q", [1, 4], TensorProto.INT8), _vi("bias", [4])], inits))
    assert ("q_act", "qdq_per_axis_activation") in found
    assert ("dq_bias", "qdq_int32_bias") in found


def test_small_int8_conv_gets_advice():
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(np.rint(w * 20).astype(np.int8), "wq"), numpy_helper.from_array(np.full(4, 0.05, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(4, np.int8), "wz")]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dq"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="dqw", axis=0),
             helper.make_node("Conv", ["dq", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    found = _rules(_model(nodes, [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 4, 8, 8])], inits))
    assert found[("conv", "int8_conv_small_channels")].severity == "advice"
    assert "Model-Optimizer" in found[("conv", "int8_conv_small_channels")].source


def test_int4_weight_only_lowering_runs_and_is_checked(transformer):
    from dscompile.compiler.ingest import IngestOptions, ingest
    from dscompile.compiler.layers import find_layers
    from dscompile.compiler.plan import LayerPlan, QuantPlan
    from dscompile.compiler.runtime import ort_session
    from dscompile.compiler.verify import cosine
    from dscompile.targets.tensorrt_qdq import lower_plan

    graph = ingest(transformer.onnx, IngestOptions(check=False)).graph
    layers = [LayerPlan(lay.name, lay.nodes, lay.op, "int4_weight" if lay.op in ("MatMul", "Gemm") else "fp32")
              for lay in find_layers(graph)]
    assert any(lp.precision == "int4_weight" for lp in layers)
    model, placement = lower_plan(graph, QuantPlan("jetson-orin", graph.sha256, tuple(layers)), None)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    int4 = {t.name for t in model.graph.initializer if t.data_type == TensorProto.INT4}
    blocked = [n for n in dqs if n.input[0] in int4]
    assert blocked and all(any(a.name == "block_size" for a in n.attribute) for n in blocked)
    scales = {t.name: t.data_type for t in model.graph.initializer}
    assert all(scales[n.input[1]] == TensorProto.FLOAT16 for n in blocked)  # the GEMM runs in FP16
    ref, got = ort_session(graph.model), ort_session(model)
    feeds = [{"ids": transformer.test_x[i:i + 1]} for i in range(8)]
    assert min(cosine(ref.run(None, x)[0], got.run(None, x)[0]) for x in feeds) > 0.99
    assert not [f for f in check_model(model, JP62, static_shapes(model)).findings if f.severity == "error"]
    old = check_model(model, JP512, static_shapes(model)).findings
    assert any(f.rule == "qdq_int4_series" for f in old)  # TensorRT 8.5 has no INT4


def _write(model: onnx.ModelProto, path):
    onnx.save(model, str(path))
    return path


def test_cli_unsupported_op_one_line(cli, tmp_path):
    m = _model([helper.make_node("Unique", ["x"], ["y"], name="dedupe")], [_vi("x", [8])], [_vi("y", ["n"])])
    out = tmp_path / "out"
    r = cli("--target", "jetson-orin", _write(m, tmp_path / "unique.onnx"), "-o", out)
    assert r.returncode == 1 and len(r.stderr_lines) == 1, r.stderr
    assert "'dedupe' (Unique)" in r.stderr and "fallback" in r.stderr and "TensorRT 10.3" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


@pytest.fixture
def dynamic_transformer(transformer, tmp_path):
    m = onnx.load(transformer.onnx)
    for vi in [*m.graph.input, *m.graph.output]:
        vi.type.tensor_type.shape.dim[0].ClearField("dim_value")
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    return _write(m, tmp_path / "dyn.onnx")


def test_cli_dynamic_shapes_need_a_profile(cli, dynamic_transformer, tmp_path):
    out = tmp_path / "out"
    r = cli("--target", "jetson-orin", dynamic_transformer, "-o", out)
    assert r.returncode == 1 and len(r.stderr_lines) == 1, r.stderr
    assert "dynamic" in r.stderr and "--shapes ids:" in r.stderr and not out.exists()
    r = cli("--target", "jetson-orin", dynamic_transformer, "--shapes", "ids:1x16/4x16/8x16", "-o", out)
    assert r.returncode == 0, r.stderr
    script = (out / "build_engine.sh").read_text()
    assert "--minShapes=ids:1x16" in script and "--optShapes=ids:4x16" in script and "--maxShapes=ids:8x16" in script


@pytest.mark.parametrize("bad", ["ids:1x16", "ids:4x16/1x16/8x16", "ids:1x16/4x16/8x16x2"])
def test_cli_bad_shapes(cli, dynamic_transformer, tmp_path, bad):
    r = cli("--target", "jetson-orin", dynamic_transformer, "--shapes", bad, "-o", tmp_path / "o")
    assert r.returncode == 1 and len(r.stderr_lines) == 1 and "--shapes" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_dynamic_shapes_profile_from_calibration(cli, dynamic_transformer, transformer, tmp_path):
    """No --shapes but --calib data: the profile is the calibration samples' shapes, said on stderr."""
    data = tmp_path / "calib.npy"
    np.save(data, np.concatenate([transformer.calib[:24], transformer.test_x[:8]]))
    out = tmp_path / "out"
    # the exported graph's Reshape keeps batch 1 although the fixture declares the axis dynamic: one row per run
    r = cli("--target", "jetson-orin", dynamic_transformer, "--calib", data, "--batch-size", "1",
            "--verify-samples", "8", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "profile from the calibration samples' shapes" in r.stderr and "--shapes ids:1x16/1x16/1x16" in r.stderr
    script = (out / "build_engine.sh").read_text()
    assert "--minShapes=ids:1x16" in script and "--optShapes=ids:1x16" in script and "--maxShapes=ids:1x16" in script


def test_calibration_records_variable_shapes():
    from dscompile.calibration.shapes import InputShapes, seen_shapes
    from dscompile.compiler.graph import TensorSpec
    from dscompile.targets.tensorrt_shapes import check_profile

    shapes = InputShapes()
    for width in (64, 200, 96, 320, 128):
        shapes.add({"x": np.zeros((1, 3, 48, width), np.float32)})
    shapes.add({"x": np.zeros((4, 3, 48, 80), np.float32)})  # a batched run counts per sample
    summary = shapes.summary()
    assert summary["x"] == {"min": [1, 3, 48, 64], "opt": [1, 3, 48, 96], "max": [1, 3, 48, 320]}

    class Table:
        extra = {"input_shapes": summary}

    assert seen_shapes(Table.extra)["x"]["max"] == (1, 3, 48, 320)
    spec = TensorSpec("x", ("batch", 3, 48, "width"))
    profile = check_profile([spec], None, Table())
    assert profile["opt"]["x"] == (1, 3, 48, 96) and profile["max"]["x"] == (1, 3, 48, 320)


def _variable_width_conv(path):
    """Conv -> ReLU -> GlobalAveragePool over [1, 4, 8, W], W dynamic (like a text-line recogniser's input)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(32, 4, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(32, np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["y"], name="gap")]
    g = helper.make_graph(nodes, "g", [_vi("x", [1, 4, 8, "width"])], [_vi("y", [1, 32, 1, 1])], [w, b])
    return _write(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_cli_variable_width_calibration_builds(cli, tmp_path):
    """Samples of several widths: the profile spans them, and bias correction (which stacks samples) is skipped, said once."""
    model = _variable_width_conv(tmp_path / "varw.onnx")
    data = tmp_path / "samples"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i, width in enumerate([16, 24, 40, 16, 32, 56, 24, 48] * 4):
        np.savez(data / f"{i:03d}.npz", x=rng.normal(size=(1, 4, 8, width)).astype(np.float32))
    out = tmp_path / "out"
    r = cli("--target", "jetson-orin", model, "--calib", data, "--verify-samples", "8", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "bias correction skipped: the calibration samples differ in shape" in r.stderr
    assert r.stderr.count("profile from the calibration samples' shapes") == 1
    script = (out / "build_engine.sh").read_text()
    assert "--minShapes=x:1x4x8x16" in script and "--maxShapes=x:1x4x8x56" in script


def test_cli_opset12_model_is_converted_not_relabelled(cli, tmp_path):
    """An opset-12 Squeeze keeps axes as an attribute; the Q/DQ graph (opset >= 13) must convert it."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(16, 4, 1, 1)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Squeeze", ["c"], ["y"], name="squeeze", axes=[2])]
    m = _model(nodes, [_vi("x", [1, 4, 1, 8])], [_vi("y", [1, 16, 8])], [w], opset=12)
    out = tmp_path / "out"
    r = cli("--target", "jetson-orin", _write(m, tmp_path / "op12.onnx"), "-o", out)
    assert r.returncode == 0, r.stderr
    model = onnx.load(out / "model.qdq.onnx")
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    squeeze = next(n for n in model.graph.node if n.op_type == "Squeeze")
    assert len(squeeze.input) == 2 and not squeeze.attribute
