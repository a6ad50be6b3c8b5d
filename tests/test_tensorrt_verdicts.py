"""The rule checker's per-layer verdicts feed DMPQ's menu for jetson-orin (zoo models, real planning)."""

from __future__ import annotations

import json

import numpy as np

from dscompile.compiler.capabilities import FP16, INT4_WEIGHT, INT8
from dscompile.compiler.ingest import IngestOptions, ingest
from dscompile.compiler.layers import ACT_MATMUL, find_layers
from dscompile.planning import prepared
from dscompile.targets.tensorrt import TARGET
from dscompile.targets.tensorrt_verdicts import layer_verdicts
from dscompile.targets.tensorrt_versions import release_for_jetpack

DEVICE = "jetson-agx-orin-64gb"  # JetPack 6.2, TensorRT 10.3


def _graph(zoo):
    return prepared(ingest(zoo.onnx, IngestOptions()).graph)


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
