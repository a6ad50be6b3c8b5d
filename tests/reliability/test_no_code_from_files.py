"""No code runs from a file: a planted pickle / .npz object array never executes without a trust flag."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch


class _Plant:
    """Unpickling this calls os.mkdir(marker): proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("planted")
    marker = d / "MARKER"
    plant = _Plant(marker)
    (d / "raw_pickle.pt").write_bytes(pickle.dumps(plant, protocol=2))
    torch.save(plant, d / "zip_pickle.pt")  # torch's zip container around the same pickle
    np.savez(d / "object.npz", x=np.array([plant, 1], dtype=object))
    np.save(d / "object.npy", np.array([plant, 1], dtype=object), allow_pickle=True)
    assert not marker.exists()
    return d, marker


MODELS = ("raw_pickle.pt", "zip_pickle.pt")
DATA = ("object.npz", "object.npy")


def _cases(onnx_model: str) -> list[tuple[str, list[str], str]]:
    """(name, argv, the word the error must give as the reason)."""
    cases = []
    for m in MODELS:
        cases += [
            (f"compile {m}", ["compile", m, "--input-shape", "x:1x1x8x8", "-o", "out/m.onnx"], "--trust-pickle"),
            (f"inspect {m}", ["inspect", m, "--input-shape", "x:1x1x8x8"], "--trust-pickle"),
            (f"calibrate {m}", ["calibrate", m, "--input-shape", "x:1x1x8x8", "--data", "object.npz",
                                "-o", "out/c.json"], "--trust-pickle"),
            (f"plan {m}", ["plan", m, "--input-shape", "x:1x1x8x8", "--calib", "object.npz", "-o", "out/p.json"],
             "--trust-pickle"),
            (f"build {m}", ["build", m, "--input-shape", "x:1x1x8x8", "--plan", "nope.json", "-o", "out/b.onnx"],
             "--trust-pickle"),
            (f"profile {m}", ["profile", m, "--input-shape", "x:1x1x8x8", "-o", "out/matrix"], "--trust-pickle"),
        ]
    for data in DATA:
        cases += [
            (f"compile --calib {data}", ["compile", onnx_model, "--calib", data, "-o", "out/m.onnx"], "pickle"),
            (f"calibrate --data {data}", ["calibrate", onnx_model, "--data", data, "-o", "out/c.json"], "pickle"),
            (f"plan --calib {data}", ["plan", onnx_model, "--calib", data, "-o", "out/p.json"], "pickle"),
        ]
    return cases


def test_no_code_runs_from_files(planted, digits, cli):
    d, marker = planted
    (d / "out").mkdir(exist_ok=True)
    failures = []
    for name, argv, reason in _cases(str(digits.onnx)):
        r = cli(*argv, cwd=d, timeout=300)
        ok = (r.returncode != 0 and len(r.stderr_lines) == 1 and "Traceback" not in r.stderr
              and reason in r.stderr and not marker.exists())
        if not ok:
            failures.append((name, r.returncode, r.stderr[-400:], marker.exists()))
    assert not marker.exists(), "code ran from a planted file"
    assert list((d / "out").iterdir()) == []
    assert not failures, failures
