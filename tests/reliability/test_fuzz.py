"""Bounded fuzzing: mutated digits ONNX files (bit flips, truncation, protobuf field swaps) and .npz data give
success with a whole output or one clean error, never a crash, a hang or a partial output.

At most 48 seeded cases and ~90 s of cases (the default suite's share); every case runs the real CLI in a
fuzz_driver process (one interpreter for many cases). benchmarks/fuzz.py runs the long campaign.
"""

from __future__ import annotations

import numpy as np

from tests.reliability.fuzzing import make_cases, run_cases

CASES, BUDGET_S, CASE_TIMEOUT_S, AT_LEAST = 48, 90.0, 60.0, 12


def test_fuzz_models_and_data(digits, calib_npz, tmp_path):
    cases = make_cases(tmp_path, digits.onnx, calib_npz, np.random.default_rng(1234), CASES)
    tried, problems = run_cases(cases, tmp_path / "cases.json", timeout=CASE_TIMEOUT_S, budget=BUDGET_S)
    print(f"fuzz: {tried} cases tried, {len(problems)} failing")
    assert not problems, problems
    # the budget bounds the time; too few cases within it would make the test vacuous
    assert tried >= AT_LEAST, f"only {tried} cases ran in {BUDGET_S:.0f} s"
