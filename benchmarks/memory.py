"""Peak memory of calibration and of per-layer sensitivity at N and 10N samples.

    python benchmarks/memory.py [--samples 100] [--model digits]

Each measurement is a child process (`dscompile calibrate`, `dscompile plan` with --sensitivity-samples),
its peak RSS read with os.wait4, so no run's memory counts towards another. Prints the 10N / N ratio:
near 1.0 means memory stays flat as the data grows (streaming histograms, one sample per sensitivity run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.zoo import build_digits  # noqa: E402


def peak_rss_mb(argv: list[str], cwd: Path) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of ``python -m dscompile ARGV`` run as a child."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "dscompile", *argv], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {err.strip()[-300:]}")
    return usage.ru_maxrss / 1024, time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=100, help="N (the second run uses 10N)")
    args = ap.parse_args()
    n = args.samples
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        zoo = build_digits(d)
        rng = np.random.default_rng(0)
        # 10N rows: the digits training rows, tiled with small noise when there are not enough of them.
        rows = zoo.calib[rng.integers(0, len(zoo.calib), 10 * n)]
        rows = rows + rng.normal(0, 0.01, rows.shape).astype(np.float32)
        for count in (n, 10 * n):
            np.save(d / f"data{count}.npy", rows[:count])
        print(f"{'stage':<12} {'samples':>8} {'peak RSS MB':>12} {'seconds':>8}")
        for stage in ("calibration", "sensitivity"):
            peaks = []
            for count in (n, 10 * n):
                if stage == "calibration":
                    argv = ["calibrate", str(zoo.onnx), "--data", f"data{count}.npy", "-q", "-o", f"c{count}.json"]
                else:
                    argv = ["plan", str(zoo.onnx), "--calib", f"data{count}.npy", "--device", "raspberry-pi-5",
                            "--sensitivity-samples", str(count), "--verify-samples", "4", "--repair-rounds", "0",
                            "-q", "-o", f"p{count}.json"]
                mb, sec = peak_rss_mb(argv, d)
                peaks.append(mb)
                print(f"{stage:<12} {count:>8} {mb:>12.1f} {sec:>8.1f}", flush=True)
            print(f"{stage}: peak RSS at {10 * n} / at {n} samples = {peaks[1] / peaks[0]:.3f}")


if __name__ == "__main__":
    main()
