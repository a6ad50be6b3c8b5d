"""The bad-input catalogue: one table, every command. Each case must give exactly one stderr line naming
the problem, a non-zero exit, no traceback (no --debug), and leave the output folder byte-identical.

Read-only and full output folders are real mounts (a tmpfs remounted read-only, a 64 KiB tmpfs): as root,
chmod does not stop writes. Set RELIABILITY_MESSAGES=FILE to dump each case's message (README table).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.reliability import catalogue_files
from tests.reliability.conftest import snapshot, tmpfs

ROOT = Path(__file__).resolve().parents[2]
Q = ["--verify-samples", "4", "--sensitivity-samples", "2", "--device", "raspberry-pi-5"]
C = ["compile", "--target", "ort-cpu"]

# name: (argv; {onnx} digits model, {calib} its data, {out} the watched output folder), words in the error)
CASES: dict[str, tuple[list[str], list[str]]] = {
    "empty model file": ([*C, "empty.onnx", "-o", "{out}/m.onnx"], ["empty.onnx"]),
    "text named .onnx": ([*C, "text.onnx", "-o", "{out}/m.onnx"], ["text.onnx"]),
    "truncated onnx": ([*C, "truncated.onnx", "-o", "{out}/m.onnx"], ["truncated.onnx"]),
    "random bytes .onnx": ([*C, "random.onnx", "-o", "{out}/m.onnx"], ["random.onnx"]),
    "random bytes .pt": ([*C, "random.pt", "-o", "{out}/m.onnx"], ["random.pt"]),
    "random bytes .pt2": ([*C, "random.pt2", "-o", "{out}/m.onnx"], ["random.pt2"]),
    "truncated torchscript": ([*C, "truncated.pt", "--input-shape", "x:1x1x8x8", "-o", "{out}/m.onnx"],
                              ["truncated.pt"]),
    "zip path traversal": ([*C, "traversal.pt", "-o", "{out}/m.onnx"], ["traversal.pt", "outside"]),
    "onnx dangling input": ([*C, "dangling.onnx", "-o", "{out}/m.onnx"], ["dangling.onnx"]),
    "onnx cycle": ([*C, "cycle.onnx", "-o", "{out}/m.onnx"], ["cycle.onnx"]),
    "external data outside folder": ([*C, "ext/model.onnx", "-o", "{out}/m.onnx"], ["model.onnx"]),
    "wrong input shape": ([*C, "{onnx}", "--input-shape", "x:1x3x8x8", "-o", "{out}/m.onnx"], ["does not match"]),
    "unknown target": (["compile", "--target", "fpga", "{onnx}", "-o", "{out}/m.onnx"], ["fpga"]),
    "unknown device": ([*C, "{onnx}", "--device", "toaster", "-o", "{out}/m.onnx"], ["toaster"]),
    "device of another target": ([*C, "{onnx}", "--device", "jetson-orin-nano-8gb", "-o", "{out}/m.onnx"],
                                 ["jetson-orin-nano-8gb"]),
    "calib with NaN": ([*C, "{onnx}", "--calib", "nan.npz", *Q, "-o", "{out}/m.onnx"], ["nan.npz", "NaN"]),
    "calib with Inf": ([*C, "{onnx}", "--calib", "inf.npz", *Q, "-o", "{out}/m.onnx"], ["inf.npz"]),
    "calib with no rows": ([*C, "{onnx}", "--calib", "empty.npz", *Q, "-o", "{out}/m.onnx"], ["empty.npz"]),
    "calib of wrong shape": ([*C, "{onnx}", "--calib", "wrong_shape.npz", *Q, "-o", "{out}/m.onnx"],
                             ["wrong_shape.npz"]),
    "calib with wrong key": ([*C, "{onnx}", "--calib", "wrong_name.npz", *Q, "-o", "{out}/m.onnx"],
                             ["wrong_name.npz"]),
    "truncated calib npz": ([*C, "{onnx}", "--calib", "truncated.npz", *Q, "-o", "{out}/m.onnx"],
                            ["truncated.npz"]),
    "unreadable images": ([*C, "{onnx}", "--calib", "images", *Q, "-o", "{out}/m.onnx"], ["img0.png"]),
    "empty data folder": ([*C, "{onnx}", "--calib", "empty_dir", *Q, "-o", "{out}/m.onnx"], ["empty_dir"]),
    "calibration table of another model": ([*C, "{onnx}", "--calib", "other_calib.json", *Q, "-o", "{out}/m.onnx"],
                                           ["another model"]),
    "plan of another model": (["build", "{onnx}", "--plan", "other_plan.json", "-o", "{out}/m.onnx"],
                              ["another model"]),
    "plan not JSON": (["build", "{onnx}", "--plan", "notjson.json", "-o", "{out}/m.onnx"], ["notjson.json"]),
    "inspect truncated": (["inspect", "truncated.onnx"], ["truncated.onnx"]),
    "calibrate missing data": (["calibrate", "{onnx}", "--data", "nope.npz", "-o", "{out}/c.json"], ["nope.npz"]),
    "generator without --trust-code": (["calibrate", "{onnx}", "--data", "os:listdir", "-o", "{out}/c.json"],
                                       ["--trust-code"]),
    "plan with int data": (["plan", "{onnx}", "--calib", "wrong_dtype.npz", *Q, "-o", "{out}/p.json"],
                           ["wrong_dtype.npz"]),
    "profile random bytes": (["profile", "random.onnx", "-o", "{out}/matrix"], ["random.onnx"]),
    "profile unknown device": (["profile", "{onnx}", "--devices", "toaster", "-o", "{out}/matrix"], ["toaster"]),
    "batch broken manifest": (["batch", "bad.toml", "-o", "{out}/batch"], ["bad.toml"]),
    "existing output without --force": ([*C, "{onnx}", "-o", "{out}/keep.txt"], ["--force"]),
    "read-only output folder": ([*C, "{onnx}", "--calib", "{calib}", *Q, "-o", "{ro}/m.onnx"], ["m.onnx"]),
    "full output folder": ([*C, "{onnx}", "--calib", "{calib}", *Q, "-q", "-o", "{full}/m.onnx"], ["no space left"]),
    "interrupt mid-run": ([*C, "{onnx}", "--calib", "{calib}", *Q, "-o", "{out}/m.onnx"], ["interrupted"]),
}
MESSAGES: dict[str, str] = {}


@pytest.fixture(scope="module")
def bad(digits, calib_npz, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("catalogue")
    catalogue_files.build(d, digits, digits.calib)
    return d


def _run(argv: list[str], cwd: Path, interrupt: bool) -> tuple[int, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dscompile", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not interrupt:
        _, err = proc.communicate(timeout=300)
        # data-quality warnings are not the error line; everything else must be the one line
        return proc.returncode, [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    # Interrupt once the run has reached calibration (its first progress line), as a user's Ctrl-C would.
    first = proc.stderr.readline()
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    # progress lines printed before the interrupt landed are not errors; the error and any traceback are
    lines = [line for line in err.splitlines() if line.startswith(("dscompile:", "Traceback", "  File"))]
    assert first.strip(), "the run printed nothing before the interrupt"
    return proc.returncode, lines


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, bad, digits, calib_npz, tmp_path):
    argv, words = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("kept\n")
    watched = out
    subs = {"{onnx}": str(digits.onnx), "{calib}": str(calib_npz), "{out}": str(out)}
    if case.startswith(("read-only", "full")):
        mount = tmp_path / "mnt"
        ctx = tmpfs(mount, size="16k", read_only=case.startswith("read-only"))
        watched = ctx.__enter__()
        subs["{ro}"] = subs["{full}"] = str(mount)
    try:
        before = snapshot(watched)
        argv = [next((a.replace(k, v) for k, v in subs.items() if k in a), a) for a in argv]
        rc, lines = _run(argv, bad, interrupt=case == "interrupt mid-run")
        after = snapshot(watched)
    finally:
        if watched is not out:
            ctx.__exit__(None, None, None)
    MESSAGES[case] = lines[-1] if lines else ""
    assert rc != 0
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    assert lines[0].startswith("dscompile: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert before == after
    assert not (bad.parent / "evil.txt").exists()


def teardown_module() -> None:
    if os.environ.get("RELIABILITY_MESSAGES") and MESSAGES:
        Path(os.environ["RELIABILITY_MESSAGES"]).write_text(json.dumps(MESSAGES, indent=1) + "\n")
