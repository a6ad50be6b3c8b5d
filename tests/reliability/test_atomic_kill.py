"""SIGKILL a compile at several points: the output folder holds nothing new or a whole, verified artifact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dscompile.fileio import sha256_file
from tests.reliability.conftest import snapshot

ROOT = Path(__file__).resolve().parents[2]
DELAYS = (1.0, 3.0, 6.0, 10.0, 20.0)  # seconds after start: import, ingest, calibration, planning, build/verify


def _check_whole_or_nothing(out: Path, before: dict[str, bytes]) -> str:
    now = snapshot(out)
    new = sorted(set(now) - set(before))
    if not new:
        return "nothing"
    assert new == ["m.onnx", "m.report.json"], new
    report = json.loads((out / "m.report.json").read_text())
    listed = {a["sha256"] for a in report["artifacts"]}
    assert sha256_file(out / "m.onnx") in listed
    return "complete"


def test_sigkill_leaves_nothing_or_a_whole_artifact(digits, calib_npz, cli, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "dscompile", "compile", "--target", "ort-cpu", str(digits.onnx), "--calib",
            str(calib_npz), "--verify-samples", "4", "--sensitivity-samples", "2", "-q"]
    outcomes = []
    for delay in DELAYS:
        out = tmp_path / f"kill_{delay}"
        out.mkdir()
        (out / "keep.txt").write_text("kept\n")
        before = snapshot(out)
        proc = subprocess.Popen([*argv, "-o", str(out / "m.onnx")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        outcomes.append((delay, _check_whole_or_nothing(out, before)))
        assert (out / "keep.txt").read_text() == "kept\n"
    print("kill outcomes", outcomes)
    # A second run into a killed location succeeds (--force in case the kill came after the commit).
    out = tmp_path / f"kill_{DELAYS[0]}"
    r = cli("compile", "--target", "ort-cpu", digits.onnx, "--calib", calib_npz, "--verify-samples", "4",
            "--sensitivity-samples", "2", "-q", "--force", "-o", out / "m.onnx")
    assert r.returncode == 0, r.stderr
    assert _check_whole_or_nothing(out, {"keep.txt": b""}) == "complete"
