"""jetson-orin target on the zoo: the folder, TensorRT's Q/DQ rules, fidelity under onnxruntime, the script."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from dscompile.calibration.table import read_trt_cache
from dscompile.targets.tensorrt_script import SCRIPT_FILE

TARGET = "jetson-orin"


def _calib(zoo, tmp_path: Path) -> Path:
    path = tmp_path / f"{zoo.name}_calib.npy"
    np.save(path, np.concatenate([zoo.calib[:48], zoo.test_x[:16]]))  # the last 16 are held out to verify
    return path


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type != TensorProto.INT4}


@pytest.fixture(scope="module")
def digits_int8(cli, digits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("digits_int8")
    out = tmp / "build_orin"
    r = cli("--target", TARGET, digits.onnx, "--calib", _calib(digits, tmp), "--dla", "0", "-o", out)
    assert r.returncode == 0, r.stderr
    return out


def test_fp16_folder_without_calibration(cli, digits, tmp_path):
    out = tmp_path / "orin_fp16"
    r = cli("--target", TARGET, digits.onnx, "-o", out)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.iterdir()} == {"model.qdq.onnx", "plan.json", SCRIPT_FILE, "report.json"}
    report = _report(out)
    assert "in place of TensorRT" in report["fidelity"]["measured_with"]
    assert report["fidelity"]["cosine"] > 0.999 and report["fidelity"]["top1_agreement"] == 1.0
    plan = json.loads((out / "plan.json").read_text())
    assert {lp["precision"] for lp in plan["layers"]} == {"fp16"}
    model = onnx.load(out / "model.qdq.onnx")
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert casts and not any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    conv_w = [i for n in model.graph.node if n.op_type == "Conv" for i in n.input[1:2]]
    assert all(_inits(model)[w].dtype == np.float16 for w in conv_w)
    engine = report["tensorrt"]["engine"]
    assert engine["built"] is False and "build_engine.sh" in engine["how"]


def test_int8_placement_follows_tensorrt_rules(digits_int8):
    model = onnx.load(digits_int8 / "model.qdq.onnx")
    inits = _inits(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        assert inits[q.input[2]].dtype == np.int8 and np.all(inits[q.input[2]] == 0)  # symmetric, zero point 0
        assert inits[q.input[1]].size == 1 and inits[q.input[1]] > 0  # per-tensor activation scale
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in producer]
    assert convs, "no INT8 convolution in the calibrated build"
    for conv in convs:
        dq = producer[conv.input[1]]
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        w, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert w.dtype == np.int8 and axis == 0 and scale.shape == (w.shape[0],)  # per output channel
        assert np.abs(w).max() <= 127
        assert inits[conv.input[2]].dtype == np.float32  # bias stays float
        assert producer[conv.input[0]].op_type == "DequantizeLinear"


def test_int8_report_cache_and_fidelity(digits_int8):
    report = _report(digits_int8)
    assert report["precision"].get("int8", 0) >= 2
    assert report["fidelity"]["top1_agreement"] >= 0.99 and report["fidelity"]["cosine"] > 0.99
    assert report["calibration"]["verified_on"] == "16 held-out samples"
    rules = report["tensorrt"]["rules"]
    assert rules["counts"]["error"] == 0 and rules["nodes_checked"] > 0
    assert rules["tensorrt"]["tensorrt"] == "10.3.0" and "onnx-tensorrt" in rules["sources"]["ops"]
    header, scales = read_trt_cache(digits_int8 / "calibration.cache")
    assert header.endswith("EntropyCalibration2") and scales and all(s > 0 for s in scales.values())
    script = (digits_int8 / SCRIPT_FILE).read_text()
    for flag in ("--onnx=model.qdq.onnx", "--stronglyTyped", "--saveEngine=model.engine",
                 "--timingCacheFile=timing.cache", "--memPoolSize=workspace:1024"):
        assert flag in script
    assert "--int8" not in script


def test_transformer_int8_quantizes_residual_inputs(cli, transformer, tmp_path):
    out = tmp_path / "tr"
    r = cli("--target", TARGET, transformer.onnx, "--calib", _calib(transformer, tmp_path), "-o", out)
    assert r.returncode == 0, r.stderr
    report = _report(out)
    placement = report["tensorrt"]["placement"]
    assert placement["residual_add_inputs"], "residual Add inputs should carry Q/DQ for TensorRT's fusion"
    assert report["precision"]["int8"] >= 4
    assert report["fidelity"]["cosine"] > 0.99 and report["fidelity"]["top1_agreement"] >= 0.95
    assert not [f for f in report["tensorrt"]["rules"]["findings"] if f["rule"] == "residual_add_unquantized"]


def test_jetpack5_build_uses_precision_flags_and_rules(cli, digits, tmp_path):
    """Orin on JetPack 5 (TensorRT 8.5) has no --stronglyTyped: the script asks for --int8 --fp16."""
    from dscompile.targets.tensorrt_script import TrtexecJob, build_script
    from dscompile.targets.tensorrt_versions import release_for_jetpack

    release = release_for_jetpack("5.1.2")
    assert release.tensorrt.startswith("8.5") and not release.strongly_typed
    script = build_script(TrtexecJob(strongly_typed=release.strongly_typed), release.label)
    assert "--int8" in script and "--fp16" in script and "--stronglyTyped" not in script


def test_dla_eligibility_and_script(digits_int8):
    out = digits_int8
    dla = _report(out)["tensorrt"]["rules"]["dla"]
    assert dla["core"] == 0 and dla["counts"]["dla"] > 0
    on_dla = {d["op"] for d in dla["dla_nodes"]}
    assert "Conv" in on_dla
    assert all(d["precision"] in ("int8", "fp16") for d in dla["dla_nodes"])
    assert all(g["reason"] for g in dla["gpu_nodes"])
    script = (out / SCRIPT_FILE).read_text()
    assert "--useDLACore=0" in script and "--allowGPUFallback" in script


def test_dla_on_a_board_without_dla(cli, digits, tmp_path):
    out = tmp_path / "nano"
    r = cli("--target", TARGET, digits.onnx, "--device", "jetson-orin-nano-8gb", "--dla", "0", "-o", out)
    assert r.returncode == 1 and len(r.stderr_lines) == 1
    assert "has no DLA" in r.stderr and not out.exists()


def test_engine_builder_needs_tensorrt(cli, digits, tmp_path):
    from dscompile.targets.tensorrt import tensorrt_importable

    if tensorrt_importable():
        pytest.skip("tensorrt imports here: --build builds (tests/test_tensorrt_engine.py)")
    out = tmp_path / "build"
    r = cli("--target", TARGET, digits.onnx, "--build", "-o", out)
    assert r.returncode == 1 and len(r.stderr_lines) == 1, r.stderr
    assert "tensorrt" in r.stderr and "pip install" in r.stderr and not out.exists()


def test_weights_in_constant_nodes_are_lowered_as_planned(cli, digits, tmp_path):
    """paddle2onnx keeps weights and biases in Constant nodes (PP-OCRv4): DMPQ plans on the normalised graph,
    where they are layers, and the TensorRT lowering must see the same layers ('not a layer of this model')."""
    from onnx import helper

    model = onnx.load(digits.onnx)
    consts = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
              for t in model.graph.initializer if len(t.dims) >= 1]
    kept = [t for t in model.graph.initializer if len(t.dims) < 1]
    nodes = consts + list(model.graph.node)
    del model.graph.initializer[:], model.graph.node[:]
    model.graph.initializer.extend(kept)
    model.graph.node.extend(nodes)
    onnx.save(model, tmp_path / "as_nodes.onnx")
    out = tmp_path / "build_orin"
    # --no-simplify: onnx-simplifier would fold the Constant nodes; --no-bias-correction: bias correction hands the
    # lowering its own normalised graph, which hid the bug (PP-OCRv4's samples differ in shape, so it was skipped)
    r = cli("--target", TARGET, tmp_path / "as_nodes.onnx", "--calib", _calib(digits, tmp_path), "--no-simplify",
            "--no-bias-correction", "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    assert _report(out)["precision"].get("int8", 0) >= 2
    qdq = onnx.load(out / "model.qdq.onnx")
    assert any(n.op_type == "Conv" for n in qdq.graph.node)
