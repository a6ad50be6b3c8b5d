"""Peak memory of calibration and of per-layer sensitivity at N and 10N samples.

    python benchmarks/memory.py [--samples 100] [--model digits|wide]

`digits` is the zoo's trained digits CNN (8x8 inputs: its 10N rows are only a few hundred KB, so its ratio
mostly shows nothing else grows). `wide` is a small conv net built here with seeded weights on 3x128x128
inputs (192 KiB a sample, ~190 MB of rows at 10N = 1000): holding the rows in memory would show.
Each measurement is a child process (`dscompile calibrate`, `dscompile plan` with --sensitivity-samples),
its peak RSS read with os.wait4 through a small launcher (tests/reliability/rss.py), so neither another run's
memory nor this script's own (torch, the data) counts towards it. Prints the 10N / N ratio:
near 1.0 means memory stays flat as the data grows (calibration streams its histograms; sensitivity keeps
its sample set and runs it in chunks of at most 4 MiB of inputs, so only the samples themselves grow).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.reliability.rss import dscompile_env, peak_rss  # noqa: E402
from tests.zoo import build_digits  # noqa: E402


def peak_rss_mb(argv: list[str], cwd: Path) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of ``python -m dscompile ARGV`` run as a child (tests/reliability/rss.py)."""
    rc, peak, seconds, err = peak_rss([sys.executable, "-m", "dscompile", *argv], cwd, dscompile_env())
    if rc != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {err.strip()[-300:]}")
    return peak / 2**20, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=100, help="N (the second run uses 10N)")
    ap.add_argument("--model", choices=("digits", "wide"), default="digits")
    args = ap.parse_args()
    n = args.samples
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        rng = np.random.default_rng(0)
        model, rows = _digits(d, rng, 10 * n) if args.model == "digits" else _wide(d, rng, 10 * n)
        for count in (n, 10 * n):
            np.save(d / f"data{count}.npy", rows[:count])
        print(f"model {args.model}: {rows[:n].nbytes / 1e6:.1f} MB of rows at N = {n}, {rows.nbytes / 1e6:.1f} MB at 10N")
        print(f"{'stage':<12} {'samples':>8} {'peak RSS MB':>12} {'seconds':>8}")
        for stage in ("calibration", "sensitivity"):
            peaks = []
            for count in (n, 10 * n):
                if stage == "calibration":
                    argv = ["calibrate", str(model), "--data", f"data{count}.npy", "-q", "-o", f"c{count}.json"]
                else:
                    argv = ["plan", str(model), "--calib", f"data{count}.npy", "--device", "raspberry-pi-5",
                            "--sensitivity-samples", str(count), "--verify-samples", "4", "--repair-rounds", "0",
                            "-q", "-o", f"p{count}.json"]
                mb, sec = peak_rss_mb(argv, d)
                peaks.append(mb)
                print(f"{stage:<12} {count:>8} {mb:>12.1f} {sec:>8.1f}", flush=True)
            print(f"{stage}: peak RSS at {10 * n} / at {n} samples = {peaks[1] / peaks[0]:.3f}")



def _digits(d: Path, rng: np.random.Generator, rows: int) -> tuple[Path, np.ndarray]:
    """The zoo's digits CNN and ``rows`` of its training rows, tiled with small noise when there are too few."""
    zoo = build_digits(d)
    x = zoo.calib[rng.integers(0, len(zoo.calib), rows)]
    return zoo.onnx, x + rng.normal(0, 0.01, x.shape).astype(np.float32)


def _wide(d: Path, rng: np.random.Generator, rows: int) -> tuple[Path, np.ndarray]:
    """Conv(3->16) ReLU Conv(16->16) ReLU GlobalAveragePool Gemm(16->10) on 3x128x128, seeded weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1)]
    inits = [w("w1", 16, 3, 3, 3), w("b1", 16), w("w2", 16, 16, 3, 3), w("b2", 16), w("w3", 10, 16), w("b3", 10)]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 128, 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    path = d / "wide.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path, rng.standard_normal((rows, 3, 128, 128)).astype(np.float32)


if __name__ == "__main__":
    main()
