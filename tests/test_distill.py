"""Distillation on the zoo's trained digits CNN: reconstruction beats round-to-nearest on held-out
data, the learned integers reach the built artifact unchanged, and bad runs never make things worse."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from dscompile.calibration.collect import calibrate
from dscompile.compiler.distill import DistillOptions, distill, model_with_rtn
from dscompile.compiler.distill_capture import run_outputs, student_model
from dscompile.compiler.distill_state import current_entries, planned_layers
from dscompile.compiler.graph import ModelGraph
from dscompile.compiler.ingest import ingest
from dscompile.compiler.layers import find_layers
from dscompile.compiler.normalize import normalize
from dscompile.compiler.plan import with_table_ranges
from dscompile.compiler.qat import FakeQuantLayer
from dscompile.compiler.qdq import affine_params
from dscompile.errors import InputError
from dscompile.targets.base import BuildOptions, get_target
from tests.distill_support import feeds_of, uniform_plan

ALL_INT8 = {"Conv": "int8", "Gemm": "int8", "MatMul": "int8"}
FAST = DistillOptions(steps=150, max_samples=96, time_s=120)


@pytest.fixture(scope="module")
def setup(digits):
    graph = ingest(digits.onnx).graph
    calib = feeds_of(digits.calib[:128], "x")
    return digits, graph, calib


def _accuracy(digits, graph, plan, rtn: bool = False) -> float:
    model = normalize(graph.model)
    layers, _ = planned_layers(model, plan)
    sim = student_model(model_with_rtn(model, layers) if rtn else model, {}, current_entries(layers))
    out = np.concatenate([o[0] for o in run_outputs(sim, feeds_of(digits.test_x, "x"))])
    return float((out.argmax(1) == digits.test_y).mean())


def test_w4a8_reconstruction_beats_round_to_nearest(setup):
    digits, graph, calib = setup
    plan = uniform_plan(graph, ALL_INT8, calib, weight_bits=4)
    res = distill(graph, plan, calib, FAST)
    rep = res.report
    print("W4A8 digits:", rep["fidelity"], [(lay["name"], lay["method"], lay["error_before"], lay["error_after"])
                                            for lay in rep["layers"]])
    assert not res.fell_back and len(rep["layers"]) == 4
    assert rep["fidelity"]["after"]["nmse"] < 0.5 * rep["fidelity"]["before"]["nmse"]
    for lay in rep["layers"]:
        assert lay["error_after"] <= lay["error_before"]
    assert any(lay["method"] == "adaround" for lay in rep["layers"])
    fp32 = digits.accuracy
    rtn_acc, after_acc = _accuracy(digits, graph, plan, rtn=True), _accuracy(digits, res.graph, res.plan)
    print(f"held-out digits accuracy: fp32 {fp32:.4f}, W4A8 RTN {rtn_acc:.4f}, reconstructed {after_acc:.4f}")
    assert after_acc >= fp32 - 0.01
    extra = res.plan.layer(rep["layers"][0]["name"]).extra["distill"]
    assert extra["method"] in ("adaround", "rtn", "rtn+bc") and "weight_sha256" in extra


def test_bias_correction_alone_never_hurts(setup):
    _, graph, calib = setup
    plan = uniform_plan(graph, ALL_INT8, calib, weight_bits=4)
    res = distill(graph, plan, calib, DistillOptions(mode="bias", max_samples=96))
    f = res.report["fidelity"]
    assert f["after"]["nmse"] <= f["before"]["nmse"]
    assert all(lay["method"] in ("rtn", "rtn+bc") for lay in res.report["layers"])


def test_learned_integers_reach_the_ort_cpu_artifact(setup, tmp_path):
    _, graph, calib = setup
    plan = uniform_plan(graph, ALL_INT8, calib)
    res = distill(graph, plan, calib, DistillOptions(steps=60, max_samples=64))
    target = get_target("ort-cpu")
    art = target.lower(res.graph, res.plan, None, tmp_path, BuildOptions())
    built = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(art.primary_path)).graph.initializer}
    layers, _ = planned_layers(res.graph.model, res.plan)
    checked = 0
    for pl in layers:
        if pl.plan.op == "Conv":
            codes = built[f"{pl.spec.weight}_quantized"].astype(np.int32)
            learned = {lay["name"]: lay for lay in res.report["layers"]}[pl.plan.name]
            mine = pl.q_rtn()  # the written weights are on the grid: their RTN codes are the learned ones
            assert np.array_equal(codes, mine), learned["method"]
            checked += 1
    assert checked == 2


def test_nan_loss_stops_and_keeps_the_best_state(setup, caplog):
    _, graph, calib = setup
    huge = [{"x": f["x"] * np.float32(1e25)} for f in calib]  # squares overflow float32: the loss turns inf
    plan = uniform_plan(graph, ALL_INT8, huge, weight_bits=4)
    with caplog.at_level(logging.WARNING, logger="dscompile"):
        res = distill(graph, plan, huge, DistillOptions(steps=50, max_samples=64))
    assert any("diverged" in lay for lay in res.report["layers"])
    assert "NaN" in caplog.text and "kept the last finite state" in caplog.text
    f = res.report["fidelity"]
    assert res.fell_back or not f["after"]["nmse"] > f["before"]["nmse"]


def test_a_run_that_makes_things_worse_falls_back(setup, digits, caplog):
    _, graph, calib = setup
    plan = uniform_plan(graph, ALL_INT8, calib, weight_bits=4)
    module = torch.jit.load(str(digits.torchscript))
    with caplog.at_level(logging.WARNING, logger="dscompile"):
        res = distill(graph, plan, calib, DistillOptions(mode="e2e", steps=20, max_samples=32, lr_scale=1e3),
                      torch_module=module)
    assert res.fell_back and "falling back to round-to-nearest" in caplog.text
    assert res.report["why"]
    assert res.graph.model.graph.initializer[0] == normalize(graph.model).graph.initializer[0]


def test_e2e_distillation_improves_on_round_to_nearest(setup, digits):
    _, graph, calib = setup
    plan = uniform_plan(graph, ALL_INT8, calib, weight_bits=4)
    module = torch.jit.load(str(digits.torchscript))
    res = distill(graph, plan, calib, DistillOptions(mode="e2e", steps=60, max_samples=64), torch_module=module)
    f = res.report["fidelity"]
    print("e2e W4A8 digits:", f, res.report["e2e"])
    assert not res.fell_back and f["after"]["nmse"] < f["before"]["nmse"]


def test_e2e_needs_a_torch_source(setup):
    _, graph, calib = setup
    plan = uniform_plan(graph, ALL_INT8, calib)
    with pytest.raises(InputError, match="--distill layer"):
        distill(graph, plan, calib, DistillOptions(mode="e2e"))


def test_too_few_samples_warns_with_the_number(setup, caplog):
    _, graph, calib = setup
    plan = uniform_plan(graph, ALL_INT8, calib)
    with caplog.at_level(logging.WARNING, logger="dscompile"):
        distill(graph, plan, calib[:10], DistillOptions(mode="bias"))
    assert "only 8 calibration samples" in caplog.text
    with pytest.raises(InputError, match="got 1"):
        distill(graph, plan, calib[:1], DistillOptions(mode="bias"))


def test_e2e_starts_from_the_calibration_tables_ranges(setup, digits):
    """A plan that leaves activation ranges to the table (``build --plan`` with --calib) gets them
    filled in as the lowering resolves them: the entry quantisers, and e2e's starting step sizes,
    are the table's, not missing."""
    _, graph, calib = setup
    plan = uniform_plan(graph, ALL_INT8, calib, weight_bits=4)
    bare = replace(plan, layers=tuple(replace(lp, activations={"method": "minmax", "symmetric": False})
                                      for lp in plan.layers))
    model = normalize(graph.model)
    assert all(pl.act is None for pl in planned_layers(model, bare)[0])  # without the table: no entry grid
    table = calibrate(graph.model, calib, model_sha256=graph.sha256, data_sha256="digits", progress=False)
    g = ModelGraph(model, graph.inputs, graph.outputs, graph.source, graph.layer_map)
    filled = with_table_ranges(bare, find_layers(g), table, {o.name for o in model.graph.output},
                               {t.name for t in model.graph.initializer})
    layers, _ = planned_layers(model, filled)
    assert layers and all(pl.act is not None for pl in layers)
    for pl in layers:  # minmax, asymmetric uint8: the ort-cpu lowering's arithmetic on the table's min/max
        tr = table.tensors[pl.spec.x]
        scale, _ = affine_params(tr.min, tr.max, "uint8")
        assert FakeQuantLayer(pl).entry.learned().scale == pytest.approx(float(scale), rel=1e-6)
    module = torch.jit.load(str(digits.torchscript))
    res = distill(graph, bare, calib, DistillOptions(mode="e2e", steps=20, max_samples=64), torch_module=module,
                  table=table)
    for pl in layers:  # the plan handed to the build carries the ranges e2e started from (or learned)
        assert pl.spec.x in res.plan.layer(pl.plan.name).activations["ranges"]


def test_a_spent_time_budget_keeps_round_to_nearest_and_says_so(setup, caplog):
    """--distill-time covers the whole stage: with none left after the held-out check, no layer is
    captured or learned; they stay round-to-nearest, and the report and a warning say which."""
    _, graph, calib = setup
    plan = uniform_plan(graph, ALL_INT8, calib, weight_bits=4)
    with caplog.at_level(logging.WARNING, logger="dscompile"):
        res = distill(graph, plan, calib, DistillOptions(steps=150, max_samples=96, time_s=1e-3))
    rep = res.report
    assert len(rep["out_of_time"]) == len(rep["layers"]) == 4 and rep["time_budget_s"] == 1e-3
    assert all(lay["method"] == "rtn" for lay in rep["layers"])
    assert rep["fidelity"]["after"]["nmse"] == pytest.approx(rep["fidelity"]["before"]["nmse"], rel=1e-6)
    assert "time budget" in caplog.text and "4 of 4 layers stay round-to-nearest" in caplog.text
