"""Shared fixtures: the zoo (trained once per session) and a CLI runner in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

torch.set_num_threads(2)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_cli(*args: str | os.PathLike, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> CliResult:
    """Run ``python -m dscompile ARGS`` against this checkout."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "dscompile", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, env=full_env,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def cli():
    return run_cli


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def digits(zoo_dir):
    from tests.zoo import build_digits

    return build_digits(zoo_dir)


@pytest.fixture(scope="session")
def digits_npy(tmp_path_factory, digits) -> Path:
    """200 of the digits CNN's calibration images as one .npy batch (--calib data for DMPQ tests)."""
    path = tmp_path_factory.mktemp("digits_data") / "digits.npy"
    np.save(path, digits.calib[:200])
    return path


@pytest.fixture(scope="session")
def transformer(zoo_dir):
    from tests.zoo import build_sequence

    return build_sequence(zoo_dir, "transformer")


@pytest.fixture(scope="session")
def gru(zoo_dir):
    from tests.zoo import build_sequence

    return build_sequence(zoo_dir, "gru")
