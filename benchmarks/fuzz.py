"""The long fuzzing campaign (the test suite runs a bounded one): mutated digits ONNX files and .npz data.

    python benchmarks/fuzz.py [--count 2000] [--time 600] [--seed 0] [--timeout 120]

Every case must end in success with a whole output or exactly one `dscompile: error:` line, within the
per-case timeout, leaving nothing behind. Cases are made in rounds of 50 (bit flips, truncation, protobuf
field swaps of the model; byte and content mutations of the data) and run through the real CLI in
fuzz_driver processes. Prints each problem as it is found, then the count of cases tried and failing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.reliability.fuzzing import make_cases, run_cases  # noqa: E402
from tests.zoo import build_digits  # noqa: E402

ROUND = 50


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--time", type=float, default=600.0, help="start no case after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per case")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        zoo = build_digits(d)
        np.savez(d / "calib.npz", x=zoo.calib[:48])
        start, tried, problems = time.monotonic(), 0, {}

        def show(case: dict, problem: str) -> None:
            print(f"{case['label']}: dscompile {' '.join(case['argv'])}: {problem}", flush=True)

        while tried < args.count and (left := args.time - (time.monotonic() - start)) > 0:
            folder = d / f"round{tried}"
            folder.mkdir()
            cases = make_cases(folder, zoo.onnx, d / "calib.npz", rng, min(ROUND, args.count - tried), tried)
            n, found = run_cases(cases, folder / "cases.json", args.timeout, left, show)
            tried += n
            problems.update(found)
            print(f"{tried} cases, {len(problems)} failing, {time.monotonic() - start:.0f} s", flush=True)
        print(f"{tried} cases in {time.monotonic() - start:.0f} s, {len(problems)} failing")
        sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
