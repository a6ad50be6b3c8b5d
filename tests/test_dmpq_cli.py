"""DMPQ end to end through the CLI on the trained zoo: plan, hand edits, build, repair, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dmpq")


@pytest.fixture(scope="module")
def digits_plan(cli, work, digits, digits_npy) -> dict:
    r = cli("plan", digits.onnx, "--calib", digits_npy, "--min-fidelity", "top1=0.99",
            "--plots", work / "plots", "-o", work / "plan.json", "-q")
    assert r.returncode == 0, r.stderr
    return json.loads((work / "plan.json").read_text())


def _one_error(r, pattern: str) -> None:
    """Non-zero exit and one error line (a calibration warning about thin data may precede it)."""
    assert r.returncode != 0
    errors = [line for line in r.stderr_lines if not line.startswith("warning:")]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith("dscompile: error:"), r.stderr
    assert pattern in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_plan_json_is_complete_and_plots_are_written(digits_plan, work):
    plan = digits_plan
    assert plan["format"] == "dscompile-plan/1" and plan["target"] == "ort-cpu" and plan["sensitivity_metric"] == "kl"
    ops = {lp["op"] for lp in plan["layers"]}
    assert {"Conv", "Gemm", "MaxPool"} <= ops
    conv = next(lp for lp in plan["layers"] if lp["op"] == "Conv")
    assert set(conv["sensitivity"]) == {"fp32", "int8"} and set(conv["cost"]) == {"fp32", "int8"}
    assert conv["cost"]["int8"]["kind"] == "measured" and "onnxruntime" in conv["cost"]["int8"]["source"]
    assert conv["activations"]["method"] == "minmax" and conv["activations"]["ranges"]
    assert plan["rounds"][0]["met"] is True and plan["predicted"]["size_ratio"] < 1
    for png in ("sensitivity.png", "allocation.png"):
        data = (work / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_hand_edited_plan_is_built_as_written(cli, digits, digits_npy, digits_plan, tmp_path):
    plan = json.loads(json.dumps(digits_plan))
    for lp in plan["layers"]:
        lp["precision"] = "int8" if lp["op"] in ("Conv", "MaxPool") else "int8_dynamic"
    plan["layers"][0]["precision"] = "fp32"  # the first conv stays float
    (tmp_path / "edited.json").write_text(json.dumps(plan))
    out = tmp_path / "q.onnx"
    # verified on held-out digits: on random inputs an x86 CPU without VNNI clips int8_dynamic (README, ort-cpu)
    r = cli("build", digits.onnx, "--plan", tmp_path / "edited.json", "--calib", digits_npy, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["precision"] == {"fp32": 1, "int8": 2, "int8_dynamic": 2}
    assert report["fidelity"]["top1_agreement"] >= 0.9
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops[0] == "Conv" and ops.count("DynamicQuantizeMatMul") == 2 and "QuantizeLinear" in ops
    assert report["plan_json"]["layers"][0]["precision"] == "fp32"  # the report carries the plan it built


def test_compile_calib_plans_repairs_and_verifies_every_zoo_model(cli, digits, transformer, gru, tmp_path):
    np.save(tmp_path / "seq.npy", transformer.calib[:160])
    for zoo, data, goal in ((transformer, tmp_path / "seq.npy", "cosine=0.99"), (gru, tmp_path / "seq.npy", "top1=0.98")):
        out = tmp_path / f"{zoo.name}.onnx"
        r = cli("--target", "ort-cpu", zoo.onnx, "--calib", data, "--min-fidelity", goal, "-o", out, "--json", "-q")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["rounds"][-1]["met"] is True
        assert report["fidelity"]["samples"] == 16  # held-out samples, not the calibration ones
        if zoo is transformer:
            assert set(report["precision"]) - {"fp32"}, report["precision"]  # something was quantised
        else:
            gru_layer = next(lp for lp in report["plan_json"]["layers"] if lp["op"] == "GRU")
            assert gru_layer["precision"] == "fp32" and "GRU" in gru_layer["reason"]


def test_repair_promotes_until_the_floor_holds(cli, digits, digits_npy, tmp_path):
    r = cli("plan", digits.onnx, "--calib", digits_npy, "--budget", "kl=1",
            "--min-fidelity", "cosine=0.9999995", "-o", tmp_path / "p.json", "--json", "-q")
    assert r.returncode == 0, r.stderr
    rounds = json.loads(r.stdout)["rounds"]
    assert len(rounds) >= 2 and rounds[-1]["met"] and not rounds[0]["met"]
    assert all(p["to"] != p["from"] for rd in rounds[1:] for p in rd["promoted"])


def test_repair_keeps_a_size_budget_by_moving_other_layers(cli, digits, digits_npy, digits_plan, tmp_path):
    """Under size=F a promotion is paired with demotions elsewhere (the knapsack re-solved around it).

    The budget is one byte over "the big Gemm at int8, every other layer at its cheapest" (bytes follow
    from the layer shapes alone): whatever the allocation, any promotion then needs a demotion."""
    layers = {lp["name"]: lp for lp in digits_plan["layers"]}
    cheapest = {n: min(c["bytes"] for c in lp["cost"].values()) for n, lp in layers.items()}
    big = max(layers, key=lambda n: layers[n]["cost"]["fp32"]["bytes"])
    pred = digits_plan["predicted"]
    fixed = pred["bytes"] - sum(lp["cost"][lp["precision"]]["bytes"] for lp in layers.values())
    limit = fixed + sum(cheapest.values()) - cheapest[big] + layers[big]["cost"]["int8"]["bytes"] + 1
    budget = float(f"{limit / pred['fp32_bytes']:.8f}")
    r = cli("plan", digits.onnx, "--calib", digits_npy, "--budget", f"size={budget:.8f}",
            "--min-fidelity", "cosine=0.9999999", "--repair-rounds", "1", "-o", tmp_path / "p.json", "--json")
    line = next((ln for ln in r.stderr_lines if "repair round 1:" in ln), "")
    promoted, moved = (int(x) for x in re.search(r"promoted (\d+), moved (\d+)", line).groups())
    assert promoted >= 1 and moved >= 1, r.stderr
    if r.returncode == 0:
        plan = json.loads(r.stdout)
        assert all(rd["predicted"]["size_ratio"] <= budget for rd in plan["rounds"][1:])
        assert any("to keep the budget" in lp["reason"] for lp in plan["layers"])
    else:
        assert f"within size={budget:g}" in r.stderr and not (tmp_path / "p.json").exists()


def test_repair_says_when_the_size_budget_binds(cli, digits, digits_npy, tmp_path):
    r = cli("plan", digits.onnx, "--calib", digits_npy, "--budget", "size=0.2",
            "--min-fidelity", "cosine=0.9999999", "-o", tmp_path / "p.json", "-q")
    _one_error(r, "within size=0.2")
    assert not (tmp_path / "p.json").exists()


# ---- bad input: one line on stderr, non-zero exit, nothing written


def test_plan_for_another_model_is_refused(cli, digits_plan, transformer, work, tmp_path):
    out = tmp_path / "x.onnx"
    r = cli("build", transformer.onnx, "--plan", work / "plan.json", "-o", out)
    _one_error(r, "plan was made for another model")
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("edit,message", [
    (lambda p: p["layers"][0].update(precision="int4_weight"), "cannot run Conv at int4_weight"),
    (lambda p: p["layers"][0].update(precision="int3"), "unknown precision 'int3'"),
    (lambda p: p["layers"][1].update(name="no_such_layer"), "'no_such_layer' does not exist in the model"),
])
def test_bad_hand_edits_are_rejected_with_the_reason(cli, digits, digits_plan, tmp_path, edit, message):
    plan = json.loads(json.dumps(digits_plan))
    edit(plan)
    (tmp_path / "p.json").write_text(json.dumps(plan))
    r = cli("build", digits.onnx, "--plan", tmp_path / "p.json", "-o", tmp_path / "q.onnx")
    _one_error(r, message)
    assert not (tmp_path / "q.onnx").exists()


def test_missing_ranges_name_the_tensor(cli, digits, digits_plan, tmp_path):
    plan = json.loads(json.dumps(digits_plan))
    conv = next(lp for lp in plan["layers"] if lp["op"] == "Conv")
    conv["precision"], conv["activations"] = "int8", {"method": "minmax"}
    (tmp_path / "p.json").write_text(json.dumps(plan))
    table = {"format": "dscompile-calibration/1", "model_sha256": plan["model_sha256"], "data_sha256": "0",
             "samples": 1, "tensors": {}}
    (tmp_path / "calib.json").write_text(json.dumps(table))
    r = cli("build", digits.onnx, "--plan", tmp_path / "p.json", "--calib", tmp_path / "calib.json", "-o", tmp_path / "q.onnx", "-q")
    _one_error(r, "but neither the plan nor the calibration table has a range for tensor")
    assert not (tmp_path / "q.onnx").exists()


def test_unreachable_budget_says_how_close_it_gets(cli, digits, digits_npy, tmp_path):
    r = cli("--target", "ort-cpu", digits.onnx, "--calib", digits_npy, "--budget", "size=0.01",
            "-o", tmp_path / "q.onnx", "-q")
    _one_error(r, "budget size=0.01 cannot be met: the smallest reachable is")
    assert not list(tmp_path.iterdir())


def test_non_numeric_outputs_are_refused(cli, tmp_path):
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["s"], name="mm"),
                           helper.make_node("ArgMax", ["s"], ["y"], name="am", axis=1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 1])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    np.save(tmp_path / "d.npy", np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32))
    out = tmp_path / "q.onnx"
    r = cli("--target", "ort-cpu", tmp_path / "m.onnx", "--calib", tmp_path / "d.npy", "-o", out, "-q")
    _one_error(r, "is int64, not a number")
    assert not out.exists()


def test_variable_length_inputs_plan_and_verify(cli, gru, tmp_path):
    data = tmp_path / "varlen"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):
        np.savez(data / f"{i:03d}.npz", ids=rng.integers(0, 12, (1, int(rng.integers(6, 17)))).astype(np.int64))
    out = tmp_path / "gru_var.onnx"
    r = cli("--target", "ort-cpu", gru.torchscript, "--input-shape", "ids:1x16:int64", "--dynamic", "ids:1",
            "--calib", data, "-o", out, "--json", "-q")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["inputs"][0]["shape"][1] == "ids_dim1"
    assert report["plan"]["predicted"]["sensitivity"]["batched"] is False  # lengths differ: one sample per run
    assert report["fidelity"]["top1_agreement"] >= 0.99 and report["rounds"][-1]["met"]


# ---- the user's own fidelity metric (--min-fidelity MODULE:FUNCTION=V, --trust-code)

_METRICS = '''
import numpy as np

def prob_overlap(reference, outputs, feed):
    """1 - total variation distance of the softmaxed scores: 1.0 only when they agree exactly."""
    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    assert set(feed) == {"x"} and feed["x"].ndim == 4
    return float(1 - 0.5 * np.abs(softmax(reference[0]) - softmax(outputs[0])).sum(-1).mean())

def half(reference, outputs, feed):
    return 0.5
'''


def test_user_metric_drives_the_repair_loop(cli, digits, digits_npy, tmp_path):
    (tmp_path / "mymetrics.py").write_text(_METRICS)
    r = cli("plan", digits.onnx, "--calib", digits_npy, "--budget", "kl=1", "--trust-code",
            "--min-fidelity", "mymetrics:prob_overlap=0.9999995", "-o", tmp_path / "p.json", "--json", "-q",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rounds = json.loads(r.stdout)["rounds"]
    assert rounds[0]["goal"] == {"mymetrics:prob_overlap": 0.9999995}
    users = [rd["fidelity"]["user"] for rd in rounds]
    assert all(u["metric"] == "mymetrics:prob_overlap" for u in users)
    assert not rounds[0]["met"] and users[0]["value"] < 0.9999995  # the floor is the user's, not cosine's
    assert rounds[-1]["met"] and users[-1]["value"] >= 0.9999995


def test_user_metric_that_cannot_be_met_fails_with_its_value(cli, digits, digits_npy, tmp_path):
    (tmp_path / "mymetrics.py").write_text(_METRICS)
    r = cli("compile", "--target", "ort-cpu", digits.onnx, "--calib", digits_npy, "--trust-code",
            "--min-fidelity", "mymetrics:half=0.9", "--repair-rounds", "1", "-o", tmp_path / "m.onnx", "-q",
            cwd=tmp_path)
    _one_error(r, "mymetrics:half=0.9: reached 0.50000")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(("extra", "message"), [
    ((), "a user metric runs Python code; pass --trust-code"),
    (("--trust-code",), "cannot import nosuchmodule"),
])
def test_user_metric_needs_trust_and_a_module(cli, digits, digits_npy, tmp_path, extra, message):
    goal = "mymetrics:half=0.9" if not extra else "nosuchmodule:f=0.9"
    (tmp_path / "mymetrics.py").write_text(_METRICS)
    r = cli("plan", digits.onnx, "--calib", digits_npy, "--min-fidelity", goal, *extra,
            "-o", tmp_path / "p.json", cwd=tmp_path)
    _one_error(r, message)
    assert not (tmp_path / "p.json").exists()
