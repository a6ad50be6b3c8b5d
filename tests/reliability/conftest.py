"""Fixtures of the reliability suite: the digits model, small data, malicious and broken files."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (recursively) with its bytes: the before/after check."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def calib_npz(digits, tmp_path_factory) -> Path:
    """48 digits rows as one stacked batch: small enough to keep every run fast."""
    path = tmp_path_factory.mktemp("data") / "calib.npz"
    np.savez(path, x=digits.calib[:48])
    return path


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64k", read_only: bool = False):
    """A small tmpfs at ``path`` (root in the sandbox may mount); skips the test when mount is refused."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        (path / "keep.txt").write_text("kept\n")
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
