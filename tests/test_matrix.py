"""The FPS matrix outputs (JSON, CSV, Markdown, PNG) and `dscompile profile` end to end on the zoo."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from dscompile.errors import InputError
from dscompile.profiles.matrix import (
    FpsMatrix,
    estimated_cell,
    measured_cell,
    missing_cell,
    save_matrix,
)

DEVICES = "this-cpu,jetson-agx-orin-64gb,snapdragon-8-gen2"


def small_matrix() -> FpsMatrix:
    m = FpsMatrix()
    m.add(measured_cell("net_a", "this-cpu", "fp32", 1, 2.0, 3.0, source="measured: onnxruntime on test", threads=2))
    m.add(estimated_cell("net_a", "jetson-agx-orin-64gb", "int8", 1, 0.5, "estimated: roofline from devices/x.toml"))
    m.add(missing_cell("net_b", "this-cpu", "fp32", "runtime not installed"))
    m.add(estimated_cell("net_b", "jetson-agx-orin-64gb", "int8", 1, 0.25, "estimated: roofline from devices/x.toml"))
    return m


def test_json_csv_md_round_trip(tmp_path):
    out = save_matrix(small_matrix(), tmp_path / "m")
    data = json.loads((out / "matrix.json").read_text())
    row = data["rows"][0]
    assert set(row) >= {"model", "device", "precision", "batch", "fps", "latency_ms", "kind", "source"}
    assert row["fps"] == 500.0 and row["latency_ms"] == {"p50": 2.0, "p99": 3.0} and row["kind"] == "measured"
    assert [r["kind"] for r in data["rows"]] == ["measured", "estimated", "missing", "estimated"]
    assert data["rows"][2]["fps"] is None and data["rows"][2]["source"] == "runtime not installed"
    assert FpsMatrix.load(out / "matrix.json").cells == small_matrix().cells
    rows = list(csv.DictReader(io.StringIO((out / "matrix.csv").read_text())))
    assert len(rows) == 4 and rows[1]["kind"] == "estimated" and float(rows[1]["fps"]) == 2000
    md = (out / "matrix.md").read_text()
    assert "| net_a | 500 | ~2,000 |" in md and "| net_b | — | ~4,000 |" in md


def test_png_has_one_cell_per_model_and_column(tmp_path):
    out = save_matrix(small_matrix(), tmp_path / "m")
    img = Image.open(out / "matrix.png").convert("RGB")
    w, h = img.size
    assert 200 < w < 2000 and 100 < h < 1000
    px = np.asarray(img).astype(int)
    # the missing cell is drawn flat grey (217, 217, 217); measured and estimated cells are coloured
    grey = (np.abs(px - 217).sum(axis=2) < 6).sum()
    coloured = ((px.max(axis=2) - px.min(axis=2)) > 60).sum()
    assert grey > 500 and coloured > 2000


def test_existing_output_needs_force(tmp_path):
    save_matrix(small_matrix(), tmp_path / "m")
    with pytest.raises(Exception, match="already exists"):
        save_matrix(small_matrix(), tmp_path / "m")
    save_matrix(small_matrix(), tmp_path / "m", force=True)


def test_bad_matrix_file(tmp_path):
    (tmp_path / "x.json").write_text('{"rows": []}')
    with pytest.raises(InputError, match="not a dscompile FPS matrix"):
        FpsMatrix.load(tmp_path / "x.json")


def test_profile_cli_on_the_zoo(cli, digits, tmp_path):
    out = tmp_path / "matrix"
    r = cli("profile", digits.onnx, "--devices", DEVICES, "--precisions", "fp32,int8", "--budget", "0.3",
            "-o", out, "--sources")
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "matrix.json").read_text())["rows"]
    here = [x for x in rows if x["device"] == "this-cpu" and x["precision"] == "fp32"]
    assert here and here[0]["kind"] == "measured" and here[0]["fps"] > 0
    assert here[0]["threads"] >= 1 and here[0]["peak_memory_mb"] > 10 and "onnxruntime" in here[0]["runtime"]
    assert all(x["extra"]["best_batch"] >= 1 and x["extra"]["search"] for x in here)
    est = [x for x in rows if x["kind"] == "estimated"]
    assert {(x["device"], x["precision"]) for x in est} == {(d, p) for d in DEVICES.split(",")[1:] for p in ("fp32", "int8")}
    assert all("devices/" in x["source"] and ".toml" in x["source"] for x in est)
    missing = [x for x in rows if x["kind"] == "missing"]
    assert missing and all("int8" in x["source"] for x in missing)  # no int8 artifact given for this-cpu
    assert "estimated" in r.stdout and "roofline from devices/jetson-agx-orin-64gb.toml" in r.stdout
    for f in ("matrix.json", "matrix.csv", "matrix.md", "matrix.png"):
        assert (out / f).is_file()


def test_profile_an_artifact_whose_runtime_is_missing_says_why(cli, digits, tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00" * 64)  # TensorRT is not installed here: the cell must say so, the rest go on
    r = cli("profile", engine, digits.onnx, "--devices", "this-cpu", "--budget", "0.2", "--no-batch-search", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    eng = [x for x in rows if x["model"] == "model"]
    assert eng and eng[0]["kind"] == "missing" and "TensorRT is not installed" in eng[0]["source"]
    assert any(x["model"] == "digits_cnn" and x["kind"] == "measured" for x in rows)


def test_profile_tflite_with_litert(cli, tmp_path):
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("ai_edge_litert")
    model = tf.keras.Sequential([tf.keras.Input((16,)), tf.keras.layers.Dense(8, activation="relu")])
    path = tmp_path / "tiny.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    r = cli("profile", path, "--devices", "this-cpu", "--budget", "0.2", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)["rows"][0]
    assert row["kind"] == "measured" and "LiteRT" in row["runtime"] and row["fps"] > 0


@pytest.mark.parametrize("args, match", [
    (("--devices", "this-cpu,nope"), "unknown device 'nope' (known: this-cpu, "),
    (("--precisions", "fp8"), "unknown precision 'fp8'"),
    (("--batches", "0"), "batch sizes must be at least 1"),
])
def test_profile_bad_input_is_one_line(cli, digits, args, match):
    r = cli("profile", digits.onnx, *args)
    assert r.returncode != 0
    assert match in r.stderr and "Traceback" not in r.stderr


def test_profile_missing_file(cli, tmp_path):
    r = cli("profile", tmp_path / "none.onnx", "--devices", "jetson-agx-orin-64gb")
    assert r.returncode == 1 and r.stderr_lines == [f"dscompile: error: {tmp_path / 'none.onnx'}: no such file"]


def test_devices_sources(cli):
    r = cli("devices", "--sources")
    assert r.returncode == 0, r.stderr
    assert "DS-10662-001" in r.stdout and "peak_int8_tops" in r.stdout
    r = cli("devices", "snapdragon-8-gen2", "--json")
    figs = json.loads(r.stdout)["figures"]
    assert figs["htp_fp16_supported"]["value"] == 1 and figs["mem_bandwidth_gbps"]["source"]
    r = cli("devices", "nope")
    assert r.returncode == 1 and "unknown device 'nope'" in r.stderr


def test_board_timing_in_a_build_report_becomes_a_measured_cell(tmp_path, digits):
    from dscompile import profiler

    build = tmp_path / "build_orin"
    build.mkdir()
    (build / "model.onnx").write_bytes(digits.onnx.read_bytes())
    timing = {"kind": "measured", "where": "trtexec on orin-01 over SSH", "tensorrt": "10.3.0", "board": "orin-01",
              "throughput_qps": 2500.0, "latency_ms": {"median": 0.4, "p99": 0.5}}
    report = {"device": "jetson-agx-orin-64gb", "artifacts": [{"path": "model.onnx", "role": "model"}],
              "engine": {"built": True, "timing": timing}}
    (build / "report.json").write_text(json.dumps(report))
    opts = profiler.ProfileOptions(devices=("jetson-agx-orin-64gb",))
    cells = profiler.profile_paths([build], opts).cells
    measured = [c for c in cells if c.kind == "measured"]
    assert len(measured) == 1 and measured[0].p50_ms == 0.4 and measured[0].fps == 2500.0
    assert "orin-01" in measured[0].source and any(c.kind == "estimated" for c in cells)
    # a stand-in replay (the SSH transport test) is never reported as a measurement
    timing["kind"] = "stand-in replay: not a measurement"
    (build / "report.json").write_text(json.dumps(report))
    assert not [c for c in profiler.profile_paths([build], opts).cells if c.kind == "measured"]
