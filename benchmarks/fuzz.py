"""Longer fuzzing than the test suite's 20 cases: mutated digits ONNX files and .npz data.

    python benchmarks/fuzz.py [--count 200] [--time 1800] [--seed 0] [--timeout 120]

Every case must end in success with a whole output or exactly one `dscompile: error:` line, within the
per-case timeout, leaving nothing behind. Prints each problem and the count of cases tried / failing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.reliability.fuzzing import MODEL_MUTATIONS, npz_mutation, run_case  # noqa: E402
from tests.zoo import build_digits  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--time", type=float, default=1800.0, help="stop after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per case")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        zoo = build_digits(d)
        src = zoo.onnx.read_bytes()
        np.savez(d / "calib.npz", x=zoo.calib[:48])
        data = (d / "calib.npz").read_bytes()
        out = d / "out"
        out.mkdir()
        start, tried, problems = time.monotonic(), 0, {}
        while tried < args.count and time.monotonic() - start < args.time:
            k = tried
            if k % 4 == 3:
                (d / f"d{k}.npz").write_bytes(npz_mutation(data, rng))
                argv = ["calibrate", str(zoo.onnx), "--data", f"d{k}.npz", "--method", "minmax", "-q",
                        "-o", str(out / f"c{k}.json")]
            else:
                mutate = MODEL_MUTATIONS[k % len(MODEL_MUTATIONS)]
                (d / f"m{k}.onnx").write_bytes(mutate(src, rng))
                argv = ["compile", f"m{k}.onnx", "--verify-samples", "2", "-q", "-o", str(out / f"m{k}.onnx")]
            msg = run_case(argv, d, out, args.timeout)
            tried += 1
            if msg:
                problems[" ".join(argv[:2])] = msg
                print(f"case {k}: {' '.join(argv)}: {msg}", flush=True)
        print(f"{tried} cases in {time.monotonic() - start:.0f} s, {len(problems)} failing")
        sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
