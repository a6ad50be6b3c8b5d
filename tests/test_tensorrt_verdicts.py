"""The rule checker's per-layer verdicts feed DMPQ's menu for jetson-orin (zoo models, real planning)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from dscompile.compiler.allocate import Budget, Choice
from dscompile.compiler.capabilities import FP16, INT4_WEIGHT, INT8, Layer
from dscompile.compiler.dmpq import DEFAULT_BUDGET, _default_capped
from dscompile.compiler.ingest import IngestOptions, ingest
from dscompile.compiler.layers import ACT_MATMUL, find_layers
from dscompile.planning import prepared
from dscompile.targets.tensorrt import TARGET
from dscompile.targets.tensorrt_plan import reference_precision
from dscompile.targets.tensorrt_verdicts import layer_verdicts
from dscompile.targets.tensorrt_versions import release_for_jetpack

DEVICE = "jetson-agx-orin-64gb"  # JetPack 6.2, TensorRT 10.3


def _graph(zoo):
    return prepared(ingest(zoo.onnx, IngestOptions()).graph)


def _graph_of_nothing():
    """A one-Identity model: capabilities without a zoo model (the verdicts find no layer)."""
    import onnx
    from onnx import TensorProto, helper

    from dscompile.compiler.graph import ModelGraph, SourceInfo, graph_inputs, graph_outputs

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name="n")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return ModelGraph(m, graph_inputs(m), graph_outputs(m), SourceInfo("m", "0", "onnx"))


def test_tiny_attention_matmuls_leave_int8_out_of_the_menu(transformer):
    """The zoo transformer's attention GEMMs have K or N < 16: the checker advises FP16, DMPQ drops INT8."""
    graph = _graph(transformer)
    caps = TARGET.capabilities(graph, DEVICE)
    attention = [lay for lay in find_layers(graph) if lay.op == ACT_MATMUL]
    assert attention
    for lay in attention:
        assert INT8 in caps.menu.for_op(lay.op)
        assert INT8 not in caps.layer_menu(lay) and FP16 in caps.layer_menu(lay)
        assert "int8_gemm_small" in caps.why_not_chosen(lay, INT8)
        assert caps.why_not(lay, INT8) is None  # advice only: a hand-edited plan may still ask for INT8
    wide = [lay for lay in find_layers(graph) if lay.op == "Gemm" and INT8 in caps.layer_menu(lay)]
    assert wide, "layers the checker has nothing against keep INT8"


def test_int4_is_vetoed_where_tensorrt_8_cannot_import_it(transformer):
    """JetPack 5 (TensorRT 8.5) has no INT4 DequantizeLinear: an error verdict, so even a hand plan is refused."""
    graph = _graph(transformer)
    old = layer_verdicts(graph, release_for_jetpack("5.1.2"))
    new = layer_verdicts(graph, release_for_jetpack("6.2"))
    old_int4 = {name for (name, p) in old.errors if p == INT4_WEIGHT}
    assert old_int4 and all("qdq_int4_series" in old.errors[(n, INT4_WEIGHT)] for n in old_int4)
    assert not {name for (name, p) in new.errors if p == INT4_WEIGHT}


def test_dmpq_plan_follows_the_verdicts(cli, transformer, tmp_path):
    """A real DMPQ plan for jetson-orin puts no INT8 where the checker says TensorRT gains nothing."""
    data = tmp_path / "calib.npy"
    np.save(data, np.concatenate([transformer.calib[:32], transformer.test_x[:8]]))
    out = tmp_path / "plan.json"
    r = cli("plan", transformer.onnx, "--target", "jetson-orin", "--device", DEVICE, "--calib", data,
            "--verify-samples", "8", "--repair-rounds", "0", "-o", out)
    assert r.returncode == 0, r.stderr
    plan = json.loads(out.read_text())
    caps = TARGET.capabilities(_graph(transformer), DEVICE)
    layers = {lay.name: lay for lay in find_layers(_graph(transformer))}
    advised = {n for n, lay in layers.items() if caps.advice(lay, INT8)}
    assert advised
    for lp in plan["layers"]:
        if lp["name"] in advised:
            assert lp["precision"] != INT8, lp
            assert "int8 left out" in lp["reason"] and "int8_gemm_small" in lp["reason"], lp["reason"]
    assert any(lp["precision"] == INT8 for lp in plan["layers"]), "the rest of the model is still quantized"
    # the default budget is capped at the reference placement's (INT8 where kept, FP16 elsewhere) sensitivity
    reference = sum(lp["sensitivity"].get(reference_precision(layers[lp["name"]], caps.layer_menu(layers[lp["name"]])),
                                          min(lp["sensitivity"].values()))
                    for lp in plan["layers"] if lp["sensitivity"])
    assert plan["budget"]["kl"] <= 0.01 and plan["budget"]["kl"] == pytest.approx(min(0.01, reference), rel=1e-3)
    assert plan["predicted"]["sensitivity"]["value"] <= plan["budget"]["kl"] * 1.001


def test_a_budget_the_user_gives_is_not_capped():
    caps = TARGET.capabilities(_graph_of_nothing(), DEVICE)
    lay = Layer("l", "Gemm", ("n",), ("x",), ("y",))
    choice = Choice("l", {INT8: (0.5, 1.0, 1.0), FP16: (0.0, 2.0, 2.0)})
    given = Budget("kl", 0.01)
    assert _default_capped(given, [lay], [choice], caps) is given
    assert _default_capped(DEFAULT_BUDGET, [lay], [choice], replace(caps, reference=lambda _: FP16)).value == 0.0
    assert _default_capped(DEFAULT_BUDGET, [lay], [choice], replace(caps, reference=lambda _: INT8)) is DEFAULT_BUDGET
