"""DMPQ internals on small hand-made graphs: the emulator matches the real build; big models; opset upgrade."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dscompile.compiler.emulate import build_emulator
from dscompile.compiler.graph import ModelGraph, SourceInfo, graph_inputs, graph_outputs
from dscompile.compiler.layers import find_layers
from dscompile.compiler.normalize import normalize
from dscompile.targets.ort_cpu_qdq import Range, lower_qdq

RNG = np.random.default_rng(3)


def _cnn(opset: int = 17) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(RNG.standard_normal(s).astype(np.float32) * 0.3, n)
             for n, s in (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (8, 8, 3, 3)), ("fc", (8 * 6 * 6, 5)))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="residual"),
        helper.make_node("Flatten", ["s"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "fc"], ["y"], name="head"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _graph(model):
    m = normalize(model)
    return ModelGraph(m, graph_inputs(m), graph_outputs(m), SourceInfo("m", "0", "onnx"))


def _ranges(model, x) -> dict[str, tuple[float, float]]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = ["x", "r1", "c2", "s", "f"]
    m.graph.output.extend(helper.make_value_info(n, onnx.TypeProto()) for n in names[1:])
    outs = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(names[1:], {"x": x})
    return {n: (float(a.min()), float(a.max())) for n, a in zip(names, [x, *outs], strict=True)}


@pytest.mark.parametrize("precision", ["int8", "int8_dynamic", "int4_weight"])
def test_emulator_reproduces_the_real_lowering_layer_by_layer(precision):
    graph = _graph(_cnn())
    layers = find_layers(graph)
    x = RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)
    ranges = _ranges(graph.model, x)
    from dscompile.targets.ort_cpu import TARGET
    from dscompile.targets.ort_cpu_isa import int8_weight_bits

    # at the weight bits this CPU computes without int16 saturation (7 on x86 without VNNI): the emulator
    # models the arithmetic, not the clipping of onnxruntime's vpmaddubsw kernels
    numerics = replace(TARGET.capabilities(graph, "this-cpu").numerics[precision], weight_bits=int8_weight_bits(True))
    chosen = [lay for lay in layers if precision == "int8" or lay.op == "MatMul"]
    emu = build_emulator(graph.model, layers, {lay.name: [numerics] for lay in chosen}, ranges, False)
    sess = ort.InferenceSession(emu.model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    run = lambda feed: sess.run(None, {k: v for k, v in {**emu.base_feed(), **feed, "x": x}.items() if k in names})[0]  # noqa: E731
    plain = ort.InferenceSession(graph.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(run({}), plain, rtol=1e-5, atol=1e-5)  # all gates closed: the FP32 model
    for lay in chosen:
        real = lower_qdq(graph.model, layers, {lay.name: precision}, {k: Range(*v) for k, v in ranges.items()},
                         weight_bits=numerics.weight_bits)
        want = ort.InferenceSession(real.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        got = run(emu.case_feed(lay, numerics))
        assert not np.allclose(got, plain, atol=1e-7), lay.name  # the gate changes something
        scale = np.abs(plain).max()
        # same arithmetic up to the runtime's requantisation rounding (one step of the output scale)
        assert np.abs(got - want).max() <= 0.02 * scale, (lay.name, np.abs(got - want).max(), scale)


def test_old_opset_model_plans_and_builds(tmp_path, monkeypatch):
    """An opset-11 model is upgraded; past the protobuf limit the build is written with external data."""
    import dscompile.compiler.onnx_io as onnx_io
    from dscompile.calibration.collect import calibrate
    from dscompile.compiler.dmpq import PlanOptions, make_plan
    from dscompile.targets.base import BuildOptions
    from dscompile.targets.ort_cpu import TARGET

    monkeypatch.setattr(onnx_io, "_PROTOBUF_LIMIT", 2_000)  # this model counts as "over 2 GB"
    graph = _graph(_cnn(opset=11))
    assert graph.model.ByteSize() > 2_000
    feeds = [{"x": RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)} for _ in range(8)]
    table = calibrate(graph.model, feeds, model_sha256=graph.sha256, data_sha256="d", progress=False,
                      tensors=["x", "r1", "c2", "s", "f"])
    caps = TARGET.capabilities(graph, "this-cpu")
    plan = make_plan(graph, caps, table, feeds, PlanOptions(show_progress=False))
    assert {lp.op for lp in plan.layers} == {"Conv", "Add", "MatMul"}
    assert all(set(lp.sensitivity) == set(caps.layer_menu(find_layers(graph)[i])) for i, lp in enumerate(plan.layers))
    forced = plan
    for lp in plan.layers:
        forced = forced.with_precision(lp.name, "int8", "test")
    artifact = TARGET.lower(graph, forced, table, tmp_path, BuildOptions())
    assert sorted(f.path for f in artifact.files) == ["model.onnx", "model.onnx.data"]
    out = TARGET.runner(artifact).run(feeds[0])[0]
    ref = ort.InferenceSession(graph.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    assert np.abs(out - ref).max() <= 0.1 * np.abs(ref).max()


def test_another_cpu_gets_a_roofline_estimate_from_its_profile(tmp_path):
    from dscompile.profiles.devices import parse_profile
    from dscompile.targets.ort_cpu_cost import OrtCpuCost

    (tmp_path / "cpu.toml").write_text(
        '[device]\nname = "Test CPU"\ntarget = "ort-cpu"\nclass = "cpu"\n'
        '[figures.peak_fp32_tflops]\nvalue = 0.1\nunit = "TFLOPS"\nsource = "test figure"\n'
        '[figures.peak_int8_tops]\nvalue = 0.4\nunit = "TOPS"\nsource = "test figure"\n'
        '[figures.mem_bandwidth_gbps]\nvalue = 10\nunit = "GB/s"\nsource = "test figure"\n'
    )
    graph = _graph(_cnn())
    cost = OrtCpuCost(graph.model, find_layers(graph), {}, None, "cpu", parse_profile(tmp_path / "cpu.toml"))
    conv = find_layers(graph)[0]  # 8x3x3x3 weights, 8*36*27 MACs
    fp32, int8 = cost.cost(conv, "fp32"), cost.cost(conv, "int8")
    assert fp32.kind == "estimated" and "cpu.toml" in fp32.source
    assert fp32.latency_ms == pytest.approx(2 * conv.macs / 0.1e12 * 1e3, rel=1e-3)  # compute-bound
    assert int8.latency_ms == pytest.approx(fp32.latency_ms / 4, rel=1e-2)
    from dscompile.targets.ort_cpu_cost import LOWERED_STRUCTURE_BYTES

    # weights (+ scales) + fp32 bias, and the lowered layer's extra protobuf structure (in the file, not streamed)
    assert fp32.bytes == 216 * 4 + 8 * 4 and int8.bytes == 216 + 8 * 4 + 8 * 4 + LOWERED_STRUCTURE_BYTES


def test_the_cost_models_timing_build_folds_relu_into_the_integer_conv(digits, tmp_path):
    """The int8 build the cost model times must be the one onnxruntime runs fast: no float Relu left
    between QLinearConvs (stand-in ranges start at 0 after a Relu, as calibrated ones do)."""
    from dscompile.compiler.ingest import ingest
    from dscompile.targets.ort_cpu import TARGET

    graph = ingest(digits.onnx).graph
    caps = TARGET.capabilities(graph, "this-cpu", threads=1)
    cost = caps.cost_model
    model = cost.lower({lay.name: "int8" for lay in cost.layers if lay.op == "Conv"})
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearConv") == 2 and "Relu" not in ops, ops


def test_a_precision_change_drops_the_old_weight_scheme_and_keeps_measured_bits():
    from dscompile.compiler.distill_quant import weight_grid
    from dscompile.compiler.plan import LayerPlan, QuantPlan

    lp = LayerPlan("mm", ("mm",), "MatMul", "int4_weight",
                   weights={"scheme": "int4_block_zero_point", "bits": 4, "block_size": 128, "int8_bits": 7})
    plan = QuantPlan("ort-cpu", "0" * 64, (lp,)).with_precision("mm", "int8_dynamic", "repair round 1")
    moved = plan.layer("mm")
    assert moved.weights == {"int8_bits": 7}  # not an int4 scheme on an int8 layer
    grid = weight_grid(moved.precision, moved.weights, "MatMul", (64, 32))
    assert grid.bits == 7 and grid.block_size == 0  # per channel, at the measured width
    same = plan.with_precision("mm", "int8_dynamic", "again")
    assert same.layer("mm").weights == {"int8_bits": 7} and same.layer("mm").reason == "again"


def test_profiled_latency_is_a_median_a_preempted_run_does_not_move(digits):
    import json as _json
    import tempfile
    from pathlib import Path

    from dscompile.targets.ort_cpu_cost import node_times

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / "p")
        sess = ort.InferenceSession(str(digits.onnx), so, providers=["CPUExecutionProvider"])
        x = digits.calib[:1]
        for _ in range(12):
            sess.run(None, {"x": x})
        events = _json.loads(Path(sess.end_profiling()).read_text())
    quiet = node_times(events, warmup=2)
    node = max(quiet, key=quiet.get)
    hits = [e for e in events if e.get("cat") == "Node" and e["name"] == f"{node}_kernel_time"]
    assert len(hits) == 12  # one per run, told apart by the session's model_run events
    hits[7]["dur"] += 50_000  # one run preempted for 50 ms on this node
    spiked = node_times(events, warmup=2)
    assert spiked[node] == pytest.approx(quiet[node], rel=0.5) and spiked[node] < 5  # a mean would be > 5 ms
    assert set(spiked) == set(quiet)
