"""Snapdragon target: linear layers written as MatMul + bias Add get the plan's precision, and DMPQ's bytes are the file's.

paddle2onnx and Hugging Face exports write a linear layer as ``MatMul`` then ``Add(bias)``;
onnx2tf folds the pair into one FULLY_CONNECTED whose output is the Add's. The op was mapped to the
Add's layer (weightless, fp32 in most plans), so a plan's int4 or int16x8 MatMul stayed float32 in
the file: PP-OCRv4's DMPQ build was 10 % over DMPQ's predicted bytes (4 such MatMuls, 346 kB).

The zoo transformer (trained here) with its Gemms rewritten as MatMul + Add (the same numbers) is
the test model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

pytest.importorskip("onnx2tf")

from dscompile.calibration.collect import calibrate  # noqa: E402
from dscompile.compiler.capabilities import FP32, INT4_WEIGHT, INT16X8  # noqa: E402
from dscompile.compiler.dmpq import fixed_cost  # noqa: E402
from dscompile.compiler.ingest import IngestOptions, ingest  # noqa: E402
from dscompile.compiler.layers import find_layers  # noqa: E402
from dscompile.compiler.plan import LayerPlan, QuantPlan  # noqa: E402
from dscompile.planning import calibration_tensors  # noqa: E402
from dscompile.profiles.runners import OrtRunner  # noqa: E402
from dscompile.targets.base import BuildOptions, get_target  # noqa: E402
from dscompile.targets.tflite_lower import prepared  # noqa: E402

DEVICE = "snapdragon-8-gen3"
# DMPQ's predicted total against the real file for a mixed int4 / int16x8 / fp32 plan (the uniform
# plans of the digits CNN hold 3 %, tests/test_tflite.py); the old mapping was 25 % under here.
TOLERANCE = 0.05


def gemm_as_matmul_add(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every Gemm(A, B, C) (alpha = beta = 1) written as MatMul(A, B') + Add(C)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    nodes = []
    for n in m.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type != "Gemm" or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if attrs.get("transB", 0):
            w = np.ascontiguousarray(w.T)
        inits[n.input[1]].CopyFrom(numpy_helper.from_array(w, n.input[1]))
        mid, bias = n.output[0] + "__matmul", n.output[0] + "__b"
        nodes.append(helper.make_node("MatMul", [n.input[0], n.input[1]], [mid], name=n.name))
        # the bias in a Constant node, as paddle2onnx writes it: the Add is then a layer of its own
        nodes.append(helper.make_node("Constant", [], [bias], name=n.name + "__bias_const",
                                      value=numpy_helper.from_array(numpy_helper.to_array(inits[n.input[2]]), bias)))
        nodes.append(helper.make_node("Add", [mid, bias], [n.output[0]], name=n.name + "__bias"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    onnx.checker.check_model(m)
    return m


@pytest.fixture(scope="module")
def linear_case(transformer, tmp_path_factory):
    path = tmp_path_factory.mktemp("matmul_add") / "transformer_matmul_add.onnx"
    onnx.save(gemm_as_matmul_add(onnx.load(str(transformer.onnx))), str(path))
    graph = ingest(path, IngestOptions(simplify=False)).graph  # onnxsim would fuse the 2-D pairs back into Gemm
    assert {n.op_type for n in graph.model.graph.node} >= {"MatMul", "Add"}
    assert "Gemm" not in {n.op_type for n in graph.model.graph.node}
    name = graph.inputs[0].name
    feeds = [{name: transformer.calib[i:i + 1]} for i in range(64)]
    table = calibrate(graph.model, feeds, model_sha256=graph.sha256, data_sha256="zoo",
                      tensors=calibration_tensors(graph), progress=False)
    test = [{name: transformer.test_x[i:i + 1]} for i in range(len(transformer.test_x))]
    return graph, table, feeds, test


def test_matmul_add_pairs_take_the_matmul_precision(linear_case, tmp_path):
    graph, table, feeds, test = linear_case
    target = get_target("snapdragon")
    g = prepared(graph)
    caps = target.capabilities(g, DEVICE)
    layers = find_layers(g)
    weighted = [lay for lay in layers if lay.op == "MatMul" and lay.weights]
    assert len(weighted) >= 4
    assert all(len(lay.nodes) == 1 for lay in weighted)  # the bias Adds are layers of their own
    # big MatMuls at int4 weights, the rest int16x8; every other layer (the bias Adds too) fp32
    want = {lay.name: INT4_WEIGHT if lay.params >= 1024 else INT16X8 for lay in weighted}
    assert set(want.values()) == {INT4_WEIGHT, INT16X8}
    plan = QuantPlan("snapdragon", graph.sha256, tuple(
        LayerPlan(lay.name, lay.nodes, lay.op, want.get(lay.name, FP32), activations={"method": "minmax", "symmetric": False})
        for lay in layers), device=DEVICE)
    stage = tmp_path / "m"
    stage.mkdir()
    art = target.lower(graph, plan, table, stage, BuildOptions(device=DEVICE, samples=tuple(feeds)))

    fc = {row["precision"]: row["count"] for row in art.notes["hexagon"]["table"] if row["op"] == "FULLY_CONNECTED"}
    assert fc == {p: list(want.values()).count(p) for p in (INT4_WEIGHT, INT16X8)}, fc  # none left float

    predicted = fixed_cost(g, layers, caps)[0] + sum(caps.cost_model.cost(lay, want.get(lay.name, FP32)).bytes
                                                     for lay in layers)
    real = art.primary_path.stat().st_size
    assert abs(predicted - real) <= TOLERANCE * real, (predicted, real)

    ref, runner = OrtRunner(graph.model), target.runner(art)
    agree = np.mean([ref.run(f)[0].argmax() == runner.run(f)[0].argmax() for f in test])
    assert agree >= 0.95, agree
