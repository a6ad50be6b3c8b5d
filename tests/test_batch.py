"""`dscompile batch`: jobs compiled, verified and profiled; failures recorded; re-runs skip; both executors."""

from __future__ import annotations

import json
import shutil

import pytest

MANIFEST = """
[batch]
targets = ["ort-cpu"]
devices = ["this-cpu", "snapdragon-8-gen2"]
precisions = ["fp32", "int8"]

[[model]]
name = "digits"
path = "digits_cnn.onnx"

[[model]]
name = "broken"
path = "not_a_model.pt"
"""


@pytest.fixture
def workdir(tmp_path, digits):
    shutil.copy(digits.onnx, tmp_path / "digits_cnn.onnx")
    (tmp_path / "not_a_model.pt").write_text("this is text, not a model")
    (tmp_path / "manifest.toml").write_text(MANIFEST)
    return tmp_path


def statuses(out) -> dict[str, dict]:
    return {j["name"]: j for j in json.loads((out / "summary.json").read_text())["jobs"]}


def test_batch_local_records_failures_goes_on_and_skips_up_to_date(cli, workdir):
    out = workdir / "out"
    r = cli("batch", workdir / "manifest.toml", "-o", out, "--jobs", "2")
    assert r.returncode == 1  # one job failed: reported, after the others ran
    assert r.stderr_lines[-1] == f"dscompile: error: 1 of 2 jobs failed (see {out / 'summary.json'})"
    assert "Traceback" not in r.stderr
    jobs = statuses(out)
    assert jobs["digits"]["status"] == "ok"
    assert jobs["broken"]["status"] == "failed" and "is a text file, not a model" in jobs["broken"]["reason"]
    assert (out / "digits.ort-cpu" / "digits.onnx").is_file() and (out / "digits.ort-cpu" / "digits.report.json").is_file()
    rows = json.loads((out / "matrix" / "matrix.json").read_text())["rows"]
    kinds = {(x["device"], x["precision"]): x["kind"] for x in rows if x["batch"] == 1}
    assert kinds[("this-cpu", "fp32")] == "measured" and kinds[("snapdragon-8-gen2", "int8")] == "estimated"
    assert (out / "matrix" / "matrix.png").is_file()
    # re-run: the successful job is up to date and skipped, the failed one is retried
    r2 = cli("batch", workdir / "manifest.toml", "-o", out, "--json")
    jobs2 = {j["name"]: j for j in json.loads(r2.stdout)["jobs"]}
    assert jobs2["digits"]["status"] == "up to date" and jobs2["broken"]["status"] == "failed"
    # a changed entry is not up to date
    (workdir / "manifest.toml").write_text(MANIFEST.replace('precisions = ["fp32", "int8"]', 'precisions = ["fp32"]'))
    r3 = cli("batch", workdir / "manifest.toml", "-o", out, "--json")
    assert {j["name"]: j for j in json.loads(r3.stdout)["jobs"]}["digits"]["status"] == "ok"


def test_batch_on_ray_gives_the_same_summary(cli, workdir):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'dscompile[ray]')")
    out = workdir / "out_ray"
    r = cli("batch", workdir / "manifest.toml", "-o", out, "--jobs", "2", "--executor", "ray", timeout=900)
    assert r.returncode == 1, r.stderr
    jobs = statuses(out)
    assert jobs["digits"]["status"] == "ok" and jobs["broken"]["status"] == "failed"
    assert (out / "matrix" / "matrix.json").is_file()


@pytest.mark.parametrize("manifest, match", [
    ("[[model]]\nname = 'x'\n", "[[model]] #1 has no path"),
    ("this is not toml = = =", "not valid TOML"),
    ("[batch]\ntargets = ['nope']\n[[model]]\npath = 'digits_cnn.onnx'\n", "unknown target 'nope'"),
    ("[batch]\ndevices = ['nope']\n[[model]]\npath = 'digits_cnn.onnx'\n", "unknown device 'nope'"),
    ("[batch]\n", "no [[model]] entries"),
])
def test_bad_manifests_are_one_line(cli, workdir, manifest, match):
    (workdir / "bad.toml").write_text(manifest)
    r = cli("batch", workdir / "bad.toml", "-o", workdir / "o")
    assert r.returncode == 1 and len(r.stderr_lines) == 1 and match in r.stderr, r.stderr
    assert not (workdir / "o").exists()  # nothing half-written


def test_bad_executor_and_unrelated_output_folder(cli, workdir):
    r = cli("batch", workdir / "manifest.toml", "-o", workdir / "o", "--executor", "spark")
    assert r.returncode == 1 and "unknown executor 'spark'" in r.stderr
    busy = workdir / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    r = cli("batch", workdir / "manifest.toml", "-o", busy)
    assert r.returncode == 1 and "holds no earlier batch" in r.stderr
