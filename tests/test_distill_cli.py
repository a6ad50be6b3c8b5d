"""``--distill`` from the command line on the zoo's digits CNN: both modes end to end, bad inputs,
and an interrupt that leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT

FAST = ["--distill-steps", "30", "--distill-samples", "48", "--threads", "1"]


@pytest.fixture(scope="module")
def data(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("distill_cli")
    np.savez(folder / "calib.npz", x=digits.calib[:200])
    np.savez(folder / "few.npz", x=digits.calib[:30])
    return folder


def test_layer_distillation_from_the_cli(cli, digits, data):
    out = data / "layer.onnx"
    r = cli("--target", "ort-cpu", digits.onnx, "--calib", data / "calib.npz", "--budget", "size=0.3",
            "--distill", *FAST, "-o", out, "--force")
    assert r.returncode == 0, r.stderr
    report = json.loads(out.with_suffix(".report.json").read_text())
    dist = report["distillation"]
    assert dist["mode"] == "layer" and dist["layers"]
    assert "artifact" in dist["fidelity"]["measured_with"]
    assert dist["fell_back"] or dist["fidelity"]["after"]["nmse"] <= dist["fidelity"]["before"]["nmse"]
    noted = [lp for lp in report["plan_json"]["layers"] if "distill" in lp.get("extra", {})]
    assert len(noted) == len(dist["layers"])
    assert "distill (layer)" in r.stdout


def test_e2e_distillation_from_a_torchscript_source(cli, digits, data):
    out = data / "e2e.onnx"
    r = cli("--target", "ort-cpu", digits.torchscript, "--input-shape", digits.input_shape, "--calib",
            data / "calib.npz", "--budget", "size=0.3", "--distill", "e2e", *FAST, "-o", out, "--force")
    assert r.returncode == 0, r.stderr
    dist = json.loads(out.with_suffix(".report.json").read_text())["distillation"]
    assert dist["mode"] == "e2e" and dist["e2e"]["steps"] >= 1
    if dist["fell_back"]:  # allowed, but it must say so
        assert "fell back to round-to-nearest" in r.stderr


def test_bias_correction_is_on_by_default_and_can_be_turned_off(cli, digits, data):
    on, off = data / "bc.onnx", data / "nobc.onnx"
    r = cli("--target", "ort-cpu", digits.onnx, "--calib", data / "calib.npz", "--budget", "size=0.3", "-o", on, "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads(on.with_suffix(".report.json").read_text())["distillation"]["mode"] == "bias"
    r = cli("--target", "ort-cpu", digits.onnx, "--calib", data / "calib.npz", "--budget", "size=0.3",
            "--no-bias-correction", "-o", off, "--force")
    assert r.returncode == 0, r.stderr
    assert "distillation" not in json.loads(off.with_suffix(".report.json").read_text())


def test_e2e_on_an_onnx_source_explains_what_it_needs(cli, digits, data):
    out = data / "bad.onnx"
    r = cli("--target", "ort-cpu", digits.onnx, "--calib", data / "calib.npz", "--distill", "e2e", "-o", out)
    assert r.returncode == 1
    assert len(r.stderr_lines) == 1 and r.stderr_lines[0].startswith("dscompile: error: --distill e2e needs")
    assert "torch source" in r.stderr and "--distill layer" in r.stderr
    assert not out.exists()


def test_too_few_samples_warns_with_the_number_used(cli, digits, data):
    out = data / "few.onnx"
    r = cli("--target", "ort-cpu", digits.onnx, "--calib", data / "few.npz", "--verify-samples", "4",
            "--budget", "size=0.3", "--distill", *FAST, "-o", out, "--force")
    assert r.returncode == 0, r.stderr
    used = json.loads(out.with_suffix(".report.json").read_text())["distillation"]["samples"]["train"]
    assert used < 32 and f"learning from only {used} calibration samples" in r.stderr


def test_distill_options_need_distill(cli, digits, data):
    r = cli("--target", "ort-cpu", digits.onnx, "--calib", data / "calib.npz", "--distill-steps", "5")
    assert r.returncode == 2 and "need --distill" in r.stderr


@pytest.fixture(scope="module")
def plan_file(digits, data):
    """A W4A8-style plan (int8 Conv/Gemm) whose activation ranges are left to the calibration table."""
    from dscompile.compiler.ingest import ingest
    from tests.distill_support import feeds_of, uniform_plan

    graph = ingest(digits.onnx).graph
    plan = uniform_plan(graph, {"Conv": "int8", "Gemm": "int8"}, feeds_of(digits.calib[:32], "x"))
    bare = plan.to_json()
    for lp in bare["layers"]:
        lp["activations"].pop("ranges", None)
    path = data / "plan.json"
    path.write_text(json.dumps(bare))
    return path, plan


def test_build_with_a_plan_distills_from_the_cli(cli, digits, data, plan_file):
    path, plan = plan_file
    out = data / "built.onnx"
    r = cli("build", digits.onnx, "--plan", path, "--calib", data / "calib.npz", "--distill", *FAST, "-o", out,
            "--force")
    assert r.returncode == 0, r.stderr
    report = json.loads(out.with_suffix(".report.json").read_text())
    dist = report["distillation"]
    assert dist["mode"] == "layer" and len(dist["layers"]) == 4
    assert "artifact" in dist["fidelity"]["measured_with"]
    assert dist["fell_back"] or dist["fidelity"]["after"]["nmse"] <= dist["fidelity"]["before"]["nmse"]
    built = {lp["name"]: lp for lp in report["plan_json"]["layers"]}
    for lp in plan.layers:  # precisions exactly as planned; the ranges the table gave are written in
        assert built[lp.name]["precision"] == lp.precision
        if lp.precision == "int8":
            assert built[lp.name]["activations"]["ranges"] and "distill" in built[lp.name]["extra"]
    assert "distill (layer)" in r.stdout


def test_build_distill_bad_inputs(cli, digits, data, plan_file):
    path, _ = plan_file
    r = cli("build", digits.onnx, "--plan", path, "--calib", data / "calib.npz", "--distill-steps", "5")
    assert r.returncode == 2 and "need --distill" in r.stderr
    out = data / "bad_build.onnx"
    r = cli("build", digits.onnx, "--plan", path, "--calib", data / "calib.npz", "--distill", "e2e", "-o", out)
    assert r.returncode == 1 and len(r.stderr_lines) == 1
    assert r.stderr_lines[0].startswith("dscompile: error: --distill e2e needs") and not out.exists()


def test_interrupt_leaves_no_half_written_artifact(digits, data):
    out = data / "interrupted.onnx"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dscompile", "--target", "ort-cpu", str(digits.onnx), "--calib", str(data / "calib.npz"),
         "--budget", "size=0.3", "--distill", "--distill-steps", "100000", "--distill-time", "600", "-o", str(out)],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline:  # wait until planning is done and distillation runs
        line = proc.stderr.readline()
        seen += line
        if "sensitivity:" in line or not line:
            break
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, seen + err
    assert "interrupted" in err
    assert not out.exists() and not out.with_suffix(".report.json").exists()
    assert not [p for p in data.iterdir() if p.name.startswith(f".{out.name}")]
