"""Same model, data, options and seed -> the same bytes, across runs and across batch --jobs.

Planning on ``this-cpu`` feeds *measured* onnxruntime latencies into the cost model, so plans made there can
differ between runs (timing noise changes which precision is cheapest). Planning against a device profile
(``--device raspberry-pi-5``: roofline estimates, no timing) removes timing from planning; that is the
reproducible mode these tests pin.
"""

from __future__ import annotations

import json
from pathlib import Path

from dscompile.fileio import sha256_file

Q = ["--verify-samples", "4", "--sensitivity-samples", "4", "--device", "raspberry-pi-5", "--seed", "3", "-q"]


def _artifact_hashes(report: Path) -> dict[str, str]:
    data = json.loads(report.read_text())
    return {a["path"]: a["sha256"] for a in data["artifacts"]}


def test_compile_and_plan_are_byte_identical(digits, calib_npz, cli, tmp_path):
    hashes, plans = [], []
    for run in ("a", "b"):
        out = tmp_path / run / "m.onnx"
        out.parent.mkdir()
        r = cli("compile", "--target", "ort-cpu", digits.onnx, "--calib", calib_npz, *Q, "-o", out)
        assert r.returncode == 0, r.stderr
        report = out.with_name("m.report.json")
        listed = _artifact_hashes(report)
        assert sha256_file(out) in listed.values()  # the report's hash is the artifact's
        hashes.append(sha256_file(out))
        p = tmp_path / run / "plan.json"
        r = cli("plan", digits.onnx, "--target", "ort-cpu", "--calib", calib_npz, *Q, "-o", p)
        assert r.returncode == 0, r.stderr
        plans.append(p.read_bytes())
    print("artifact sha256", hashes)
    assert hashes[0] == hashes[1]
    assert plans[0] == plans[1]


def test_batch_jobs_1_and_2_give_the_same_artifacts(digits, transformer, cli, tmp_path):
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(
        '[batch]\ntargets = ["ort-cpu"]\ndevices = ["raspberry-pi-5"]\nprecisions = ["fp32"]\n\n'
        f'[[model]]\nname = "digits"\npath = "{digits.onnx}"\n\n'
        f'[[model]]\nname = "transformer"\npath = "{transformer.onnx}"\n'
    )
    seen = []
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        r = cli("batch", manifest, "-o", out, "--jobs", jobs, "-q")
        assert r.returncode == 0, r.stderr
        reports = sorted(out.glob("*/*.report.json"))
        assert len(reports) == 2, sorted(p.relative_to(out) for p in out.rglob("*"))
        seen.append({str(p.relative_to(out)): _artifact_hashes(p) for p in reports})
    print("batch artifact sha256", seen[0])
    assert seen[0] == seen[1]
