"""Snapdragon remote timing without a phone: benchmark_model's real output, and adb's real errors.

The parser reads real benchmark_model output kept in tests/data/benchmark_model
(sources in SOURCES.md). adb itself is the one thing faked: a script on PATH
that prints what adb prints when the serial is not connected or not authorized.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from dscompile.errors import InputError
from dscompile.profiles.adb import Adb, adb_error, benchmark_command
from dscompile.profiles.benchmark_model import parse_benchmark_output
from dscompile.targets.base import BuildOptions

DATA = Path(__file__).parent / "data" / "benchmark_model"

# What adb (platform-tools 35) prints on stderr, exit status 1 (packages/modules/adb transport.cpp).
ADB_NOT_FOUND = "adb: device '{serial}' not found"
ADB_UNAUTHORIZED = (
    "adb: device unauthorized.\nThis adb server's $ADB_VENDOR_KEYS is not set\n"
    "Try 'adb kill-server' if that seems wrong.\nOtherwise check for a confirmation dialog on your device."
)


def read(name: str) -> str:
    return (DATA / name).read_text()


def test_parses_android_logcat_run():
    r = parse_benchmark_output(read("android_xnnpack_int8_logcat.txt"))
    assert (r.init_ms, r.first_ms, r.warmup_avg_ms, r.avg_ms) == (92.318, 235.158, 211.669, 145.528)
    assert r.runs == 25 and r.std_ms == 13.583 and r.median_ms == 141.253  # the timed runs, not the warm-up
    assert (r.memory_init_mb, r.memory_overall_mb) == (54.2852, 73.4102)
    assert r.delegate == "TfLiteXNNPackDelegate" and r.delegated_nodes == (539, 548) and r.partitions == 19
    assert r.fps == pytest.approx(1000 / 145.528)


def test_parses_peak_memory_and_gpu_delegate():
    cpu = parse_benchmark_output(read("linux_xnnpack_cpu.txt"))
    assert cpu.avg_ms == pytest.approx(56.2658) and cpu.runs == 1061 and cpu.peak_memory_mb == 93.2383
    gpu = parse_benchmark_output(read("linux_gpu_opencl.txt"))
    assert gpu.delegate == "TfLiteGpuDelegateV2" and gpu.init_ms == pytest.approx(842.225)
    assert gpu.avg_ms == pytest.approx(35.1349) and gpu.to_json()["fps"] == pytest.approx(28.462, rel=1e-3)


def test_parses_output_without_log_prefixes():
    r = parse_benchmark_output(read("rpi4_plain.txt"))
    assert r.runs == 50 and r.avg_ms == pytest.approx(33.0718) and r.std_ms == pytest.approx(0.129)
    short = parse_benchmark_output(read("rockpi_memory_delta.txt"))
    assert short.runs is None and short.memory_overall_mb == 73.3438


def test_qnn_delegate_partition_line():
    # The QNN delegate's own summary line, as quoted in public on-device validation scripts.
    text = ("TfLiteQnnDelegate delegate: 163 nodes delegated out of 163 nodes with 1 partitions.\n"
            + read("rockpi_memory_delta.txt"))
    r = parse_benchmark_output(text)
    assert r.delegate == "TfLiteQnnDelegate" and r.delegated_nodes == (163, 163) and r.partitions == 1


def test_failed_run_names_the_error():
    with pytest.raises(InputError, match="Failed to apply GPU delegate"):
        parse_benchmark_output(read("gpu_delegate_failed.txt"))


def test_benchmark_command_per_delegate():
    htp = benchmark_command("/data/local/tmp/dscompile/m.tflite", "htp", 4, 50)
    assert "--external_delegate_path=/data/local/tmp/dscompile/libQnnTFLiteDelegate.so" in htp
    assert "backend_type:htp" in htp and "ADSP_LIBRARY_PATH" in htp
    assert "--use_gpu=true" in benchmark_command("m", "gpu", 4, 50)
    assert "--use_xnnpack=true" in benchmark_command("m", "cpu", 4, 50)


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    """An ``adb`` on PATH that prints what real adb prints for the state in FAKE_ADB_STATE."""
    script = tmp_path / "bin" / "adb"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/sh\n"
        'serial="$2"\n'
        'case "$FAKE_ADB_STATE" in\n'
        f"  none) echo \"{ADB_NOT_FOUND}\" | sed \"s/{{serial}}/$serial/\" >&2; exit 1;;\n"
        f"  unauthorized) printf '%s\\n' \"{ADB_UNAUTHORIZED.replace('$', chr(92) + '$')}\" >&2; exit 1;;\n"
        "esac\n"
        "exit 0\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return script


def test_no_device(fake_adb, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_STATE", "none")
    with pytest.raises(InputError, match=r"no ADB device 'R5CT1234' is connected.*not found"):
        Adb("R5CT1234").check()


def test_unauthorized_device(fake_adb, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_STATE", "unauthorized")
    with pytest.raises(InputError, match=r"'R5CT1234' is unauthorized: unlock the phone and accept"):
        Adb("R5CT1234").check()


def test_adb_error_texts_are_one_line():
    for text in (ADB_UNAUTHORIZED, ADB_NOT_FOUND.format(serial="X"), "error: device offline"):
        assert "\n" not in str(adb_error("X", text))


def test_remote_must_be_adb():
    from dscompile.targets.tflite_remote import remote_request

    with pytest.raises(InputError, match="--remote adb:SERIAL"):
        remote_request(BuildOptions(remote="pi@board.local"))
    assert remote_request(BuildOptions()) is None


@pytest.fixture
def tiny_onnx(tmp_path_factory) -> Path:
    """A two-op ONNX model: these tests exercise error paths, not fidelity."""
    import onnx
    from onnx import parser

    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 18]> g (float[1,4] x) => (float[1,4] y) { h = Relu(x)\n y = Sigmoid(h) }'
    ), path)
    return path


def test_cli_no_device_fails_before_building(cli, tiny_onnx, fake_adb, tmp_path):
    out = tmp_path / "m.tflite"
    env = {"PATH": os.environ["PATH"], "FAKE_ADB_STATE": "none"}
    r = cli("--target", "snapdragon", tiny_onnx, "--remote", "adb:R5CT1234", "-o", out, env=env)
    assert r.returncode == 1, r.stderr
    assert r.stderr_lines == ["dscompile: error: no ADB device 'R5CT1234' is connected (check `adb devices`; "
                              "adb says: adb: device 'R5CT1234' not found)"]
    assert list(tmp_path.iterdir()) == [fake_adb.parent]  # nothing written


@pytest.mark.skip(reason="needs an Android phone on USB with debugging authorized, and benchmark_model for it")
def test_times_on_a_phone():
    """Run with a phone: dscompile --target snapdragon m.onnx --remote adb:SERIAL --benchmark-binary benchmark_model."""


BLOCK_STACK = "import sys\nfor m in ('ai_edge_litert', 'ai_edge_quantizer', 'onnx2tf', 'tensorflow', 'tf_keras'):\n    sys.modules[m] = None\n"


def test_missing_stack_says_the_pip_line(tiny_onnx, tmp_path):
    import subprocess

    from tests.conftest import ROOT

    code = BLOCK_STACK + (
        "import dscompile.targets.tflite as t\n"  # the module imports without the stack
        "print(t.TARGET.available())\n"
        "from dscompile.cli import main\n"
        f"main(['--target', 'snapdragon', {str(tiny_onnx)!r}, '-o', {str(tmp_path / 'm.tflite')!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 1
    assert "(False, 'pip install --no-deps -r requirements/snapdragon.lock')" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["dscompile: error: target snapdragon's runtime is not installed; install it with: "
                     "pip install --no-deps -r requirements/snapdragon.lock"]
    assert not list(tmp_path.iterdir())
