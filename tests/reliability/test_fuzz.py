"""Bounded fuzzing: mutated digits ONNX files and .npz data give success or one clean error, never a hang
or partial output. 20 cases here (seeded); benchmarks/fuzz.py runs more."""

from __future__ import annotations

import numpy as np

from tests.reliability.fuzzing import MODEL_MUTATIONS, npz_mutation, run_case

MODEL_CASES, DATA_CASES = 14, 6


def test_fuzz_models_and_data(digits, calib_npz, tmp_path):
    rng = np.random.default_rng(1234)
    src, data = digits.onnx.read_bytes(), calib_npz.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    problems = {}
    for k in range(MODEL_CASES):
        mutate = MODEL_MUTATIONS[k % len(MODEL_MUTATIONS)]
        model = tmp_path / f"m{k}.onnx"
        model.write_bytes(mutate(src, rng))
        msg = run_case(["compile", "--target", "ort-cpu", model.name, "--verify-samples", "2", "-q",
                        "-o", str(out / f"m{k}.onnx")], tmp_path, out)
        if msg:
            problems[f"{mutate.__name__} #{k}"] = msg
    for k in range(DATA_CASES):
        npz = tmp_path / f"d{k}.npz"
        npz.write_bytes(npz_mutation(data, rng))
        msg = run_case(["calibrate", str(digits.onnx), "--data", npz.name, "--method", "minmax", "-q",
                        "-o", str(out / f"c{k}.json")], tmp_path, out)
        if msg:
            problems[f"npz #{k}"] = msg
    assert not problems, problems
