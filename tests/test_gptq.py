"""GPTQ int4 rounding (compiler/gptq.py) on the zoo's trained TinyEncoder: fewer output errors than
round-to-nearest at the same bytes, in the real MatMulNBits build, and the sensitivity pass sees it."""

from __future__ import annotations

import numpy as np
import pytest

from dscompile.compiler import gptq, qdq
from dscompile.compiler.ingest import IngestOptions, ingest
from dscompile.compiler.layers import find_layers
from dscompile.compiler.normalize import prepared
from dscompile.compiler.runtime import ort_session
from dscompile.targets.ort_cpu_qdq import INT4_BLOCK, lower_qdq


@pytest.fixture(scope="module")
def encoder(transformer):
    g = prepared(ingest(transformer.onnx, IngestOptions()).graph)
    layers = find_layers(g)
    nodes = {n.name: n for n in g.model.graph.node}
    linear = [lay for lay in layers if lay.op in ("MatMul", "Gemm") and lay.weights]
    calib = [{"ids": transformer.calib[i : i + 1]} for i in range(48)]
    held = [{"ids": transformer.test_x[i : i + 1]} for i in range(48)]
    tensors = gptq.matmul_inputs(g.model, [lay.nodes[0] for lay in linear])
    return g, layers, nodes, linear, calib, held, tensors


def _kn(g, node):
    from dscompile.targets.ort_cpu_qdq import _matmul_weight

    return _matmul_weight(qdq.GraphEditor(g.model), node)[0]


def test_gptq_lowers_each_layers_output_error_on_held_out_inputs_at_the_same_bytes(encoder):
    g, _, nodes, linear, calib, held, tensors = encoder
    assert len(linear) >= 8
    fit = gptq.capture_hessians(g.model, tensors, calib)
    check = gptq.capture_hessians(g.model, tensors, held)  # the error is judged on inputs GPTQ never saw
    rtn_total = gptq_total = 0.0
    for lay in linear:
        node = nodes[lay.nodes[0]]
        w = _kn(g, node)
        rtn, ours = qdq.block_int4(w, INT4_BLOCK), gptq.gptq_block_int4(w, fit[node.input[0]], INT4_BLOCK)
        for a, b in ((rtn.packed, ours.packed), (rtn.scales, ours.scales), (rtn.zero_points, ours.zero_points)):
            assert a.shape == b.shape and a.dtype == b.dtype  # same layout, same bytes
        e_rtn = gptq.output_error(w, rtn.dequantize(), check[node.input[0]])
        e_ours = gptq.output_error(w, ours.dequantize(), check[node.input[0]])
        rtn_total, gptq_total = rtn_total + e_rtn, gptq_total + e_ours
    assert gptq_total < 0.8 * rtn_total, (gptq_total, rtn_total)


def _cos(refs, gots) -> float:
    return float(np.mean([(r.ravel() @ o.ravel()) / (np.linalg.norm(r) * np.linalg.norm(o)) for r, o in zip(refs, gots, strict=True)]))


def test_matmulnbits_build_with_gptq_beats_round_to_nearest_on_held_out_outputs(encoder, tmp_path):
    g, layers, _, linear, calib, held, tensors = encoder
    hessians = gptq.capture_hessians(g.model, tensors, calib)
    precisions = {lay.name: "int4_weight" for lay in linear}
    ref = ort_session(g.model, 1)
    refs = [ref.run(None, f)[0] for f in held]
    errors, sizes = {}, {}
    for name, h in (("nearest", None), ("gptq", hessians)):
        model = lower_qdq(g.model, layers, precisions, {}, h)
        assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == len(linear)
        sizes[name] = sum(t.ByteSize() for t in model.graph.initializer)
        sess = ort_session(model, 1)
        gots = [sess.run(None, f)[0] for f in held]
        errors[name] = 1 - _cos(refs, gots)
    assert sizes["gptq"] == sizes["nearest"]
    assert errors["gptq"] < 0.8 * errors["nearest"], errors
    again = lower_qdq(g.model, layers, precisions, {}, gptq.capture_hessians(g.model, tensors, calib))
    first = lower_qdq(g.model, layers, precisions, {}, hessians)
    assert again.SerializeToString() == first.SerializeToString()  # deterministic


def test_sensitivity_measures_the_gptq_weights_the_build_writes(encoder):
    from dscompile.compiler.emulate import build_emulator
    from dscompile.targets.ort_cpu import TARGET

    g, layers, nodes, linear, calib, held, tensors = encoder
    numerics = TARGET.capabilities(g, "this-cpu").numerics["int4_weight"]
    assert numerics.rounding == "gptq"
    hessians = gptq.layer_hessians(g.model, tensors, calib)
    lay = linear[-2]  # the last FFN layer: K = 64, two blocks
    emu = build_emulator(g.model, layers, {lay.name: [numerics]}, {}, False, hessians=hessians)
    sess = ort_session(emu.model, 1)
    built = ort_session(lower_qdq(g.model, layers, {lay.name: "int4_weight"}, {}, hessians), 1)
    nearest = ort_session(lower_qdq(g.model, layers, {lay.name: "int4_weight"}, {}, None), 1)
    for f in held[:8]:
        emulated = sess.run(None, {**emu.base_feed(), **emu.case_feed(lay, numerics), **f})[0]
        real, rtn = built.run(None, f)[0], nearest.run(None, f)[0]
        assert np.allclose(emulated, real, rtol=1e-4, atol=1e-4)
    assert not np.allclose(real, rtn, rtol=1e-4, atol=1e-4)  # and GPTQ is not round-to-nearest here


def test_hessians_from_samples_of_different_lengths_sum_every_token():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n", 3])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, n, 4)).astype(np.float32)} for n in (3, 7, 1)]
    h = gptq.capture_hessians(model, ["x"], feeds)["x"]
    xs = np.concatenate([f["x"][0] for f in feeds]).astype(np.float64)
    assert np.allclose(h, xs.T @ xs)


def test_too_few_rows_for_a_hessian_say_so(encoder, caplog):
    g, _, _, _, calib, _, tensors = encoder
    width = max(gptq.capture_hessians(g.model, tensors, calib[:1])[t].shape[0] for t in tensors)
    rows_per_sample = calib[0]["ids"].size  # one row per token
    few = calib[: max(1, (width - 1) // rows_per_sample)]
    with caplog.at_level("WARNING", logger="dscompile"):
        gptq.capture_hessians(g.model, tensors, few)
    assert any("saw fewer rows than their width" in r.message and "calibrate on more samples" in r.message
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="dscompile"):
        gptq.capture_hessians(g.model, tensors, calib)
    assert not any("fewer rows" in r.message for r in caplog.records), [r.message for r in caplog.records]
