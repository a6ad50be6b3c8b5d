"""`dscompile calibrate` and `compile --calib` on the zoo: tables, TensorRT caches, reuse, and every bad input."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from PIL import Image

from dscompile.calibration.table import CalibrationTable, read_trt_cache
from tests.test_calibration_methods import reference_entropy


def _one_error(r, *words: str) -> None:
    assert r.returncode != 0, r.stdout
    assert len(r.stderr_lines) == 1, r.stderr
    line = r.stderr_lines[0]
    assert line.startswith("dscompile: error:") and "Traceback" not in r.stderr
    for w in words:
        assert w in line, line


@pytest.fixture(scope="module")
def digits_npy(digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("digits") / "calib.npy"
    np.save(path, digits.calib[:300])
    return path


def test_calibrate_digits_writes_table_and_trt_cache(cli, digits, digits_npy, tmp_path):
    out, cache = tmp_path / "calib.json", tmp_path / "calib.cache"
    r = cli("calibrate", digits.onnx, "--data", digits_npy, "-o", out, "--trt-cache", cache)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["format"] == "dscompile-calibration/1" and data["samples"] == 300
    assert {"model_sha256", "data_sha256", "tensors"} <= set(data)
    some = next(iter(data["tensors"].values()))
    assert set(some["amax"]) == {"entropy", "minmax", "percentile", "mse"}
    assert len(some["histogram"]["bins"]) >= 2048 and some["histogram"]["range"][0] == 0.0
    header, scales = read_trt_cache(cache)
    assert header.endswith("-EntropyCalibration2")
    table = CalibrationTable.load(out)
    assert set(scales) == set(table.tensors)
    for name, tr in table.tensors.items():
        assert scales[name] == struct.unpack(">f", struct.pack(">f", tr.amax["entropy"] / 127))[0]
    # entropy on real activations equals the reference search on the same histogram
    relu = [n for n in table.tensors if "relu" in n][0]
    h = table.range(relu).histogram
    width = h["range"][1] / len(h["bins"])
    assert table.range(relu).amax["entropy"] == pytest.approx(
        min(reference_entropy(np.array(h["bins"]), width), table.range(relu).absmax), rel=1e-9)


def test_table_reuse_force_and_mismatch(cli, digits, transformer, digits_npy, tmp_path):
    out = tmp_path / "calib.json"
    assert cli("calibrate", digits.onnx, "--data", digits_npy, "-o", out).returncode == 0
    before = out.read_text()
    r = cli("calibrate", digits.onnx, "--data", digits_npy, "-o", out)
    assert r.returncode == 0 and "reusing" in r.stderr and "reused" in r.stdout
    assert out.read_text() == before
    r = cli("calibrate", digits.onnx, "--data", digits_npy, "-o", out, "--force")
    assert r.returncode == 0 and "written" in r.stdout
    other = tmp_path / "other.npy"
    np.save(other, digits.calib[:50])
    _one_error(cli("calibrate", digits.onnx, "--data", other, "-o", out), "other data", "--force")
    seq = tmp_path / "seq.npy"
    np.save(seq, transformer.calib[:20])
    _one_error(cli("calibrate", transformer.onnx, "--data", seq, "-o", out), "another model")
    assert out.read_text() == before  # untouched by both refusals (and --force recomputed the same table)
    assert cli("calibrate", transformer.onnx, "--data", seq, "-o", out, "--force").returncode == 0
    r = cli("calibrate", digits.onnx, "--data", digits_npy, "-o", tmp_path / "m.json", "--method", "minmax",
            "--trt-cache", tmp_path / "m.cache")
    assert r.returncode == 0 and read_trt_cache(tmp_path / "m.cache")[0].endswith("-MinMaxCalibration")
    assert set(json.loads((tmp_path / "m.json").read_text())["tensors"]["x"]["amax"]) == {"minmax"}
    # compile refuses a table made for another model unless --force
    _one_error(cli("compile", digits.onnx, "--calib", out, "-o", tmp_path / "d.onnx"), "another model")
    assert not (tmp_path / "d.onnx").exists()


def test_calibrate_digits_image_folder(cli, digits, tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(digits.calib[:40]):
        Image.fromarray((img[0] * 255).round().astype(np.uint8), "L").save(folder / f"{i:03d}.png")
    out = tmp_path / "img.json"
    r = cli("calibrate", digits.onnx, "--data", folder, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["samples"] == 40
    x = CalibrationTable.load(out).range("x")
    assert x.min == 0.0 and x.max == pytest.approx(digits.calib[:40].max(), abs=1 / 255)


@pytest.fixture(scope="module")
def varlen_transformer(transformer, tmp_path_factory):
    """The zoo transformer exported with dynamic batch and sequence axes (positions sliced to the length)."""
    import onnx
    import torch
    from torch import nn

    class VarLen(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.m.encoder(self.m.embed(ids) + self.m.pos[:, : ids.shape[1]])
            return self.m.head(h.mean(1))

    seq = torch.export.Dim("seq", min=2, max=16)
    prog = torch.onnx.export(VarLen(transformer.module).eval(), (torch.zeros(2, 16, dtype=torch.int64),),
                             dynamo=True, opset_version=18, input_names=["ids"],
                             dynamic_shapes=({0: torch.export.Dim.DYNAMIC, 1: seq},), optimize=True)
    path = tmp_path_factory.mktemp("varlen") / "transformer_varlen.onnx"
    onnx.save(prog.model_proto, str(path))
    return path


def test_transformer_variable_lengths_in_npz_folder(cli, varlen_transformer, tmp_path):
    folder = tmp_path / "seqs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = 0
    for i in range(40):
        batch, length = 1 + i % 3, 4 + (i * 5) % 13
        np.savez(folder / f"{i:03d}.npz", ids=rng.integers(0, 12, (batch, length)))
        rows += batch
    out = tmp_path / "seq.json"
    r = cli("calibrate", varlen_transformer, "--data", folder, "-o", out)
    assert r.returncode == 0, r.stderr
    table = CalibrationTable.load(out)
    assert table.samples == rows
    assert "ids" not in table.tensors and len(table.tensors) > 10  # int64 ids are not quantised
    assert all(tr.absmax > 0 for tr in table.tensors.values())
    model = tmp_path / "m.onnx"
    r = cli("compile", varlen_transformer, "--calib", folder, "-o", model, "--json", "--verify-samples", "6")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    held_rows = report["fidelity"]["samples"]  # the rows of the 6 held-out files, verified one by one
    assert report["calibration"]["verified_on"] == f"{held_rows} held-out samples" and held_rows >= 6
    assert report["calibration"]["samples"] + held_rows == rows


# -- bad input: one line, non-zero exit, nothing written ----------------------------------------

FAST = ("--no-simplify",)  # skip onnx-simplifier's start-up where the graph does not matter


def _npz(folder, name, **arrays):
    folder.mkdir(exist_ok=True)
    np.savez(folder / name, **arrays)
    return folder


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("empty", ["no calibration data"]),
        ("keys", ["b.npz", "pixels", "x"]),
        ("rank", ["b.npz", "rank 3", "rank 4"]),
        ("dtype", ["b.npz", "int64", "float32"]),
        ("nan", ["b.npz", "input x", "NaN"]),
        ("inf", ["b.npz", "input x", "Inf"]),
        ("image", ["broken.png", "cannot read the image"]),
    ],
)
def test_bad_data_files(cli, digits, tmp_path, case, words):
    good = np.zeros((1, 1, 8, 8), np.float32)
    d = tmp_path / "data"
    d.mkdir()
    _npz(d, "a.npz", x=good)
    if case == "empty":
        d = tmp_path / "empty"
        d.mkdir()
    elif case == "keys":
        _npz(d, "b.npz", pixels=good)
    elif case == "rank":
        _npz(d, "b.npz", x=good[0])
    elif case == "dtype":
        _npz(d, "b.npz", x=good.astype(np.int64))
    elif case in ("nan", "inf"):
        bad = good.copy()
        bad[0, 0, 3, 3] = np.nan if case == "nan" else np.inf
        _npz(d, "b.npz", x=bad)
    elif case == "image":
        d = tmp_path / "imgs"
        d.mkdir()
        Image.new("L", (8, 8)).save(d / "a.png")
        (d / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "c.json"
    _one_error(cli("calibrate", digits.onnx, "--data", d, "-o", out, *FAST), *words)
    assert not out.exists() and not list(tmp_path.glob(".c.json*"))


def test_generators_need_trust_and_report_their_errors(cli, digits, tmp_path):
    (tmp_path / "gens.py").write_text(
        "import numpy as np\n"
        "def ok():\n    for i in range(4):\n        yield np.full((1, 1, 8, 8), i / 4, np.float32)\n"
        "def boom():\n    yield np.zeros((1, 1, 8, 8), np.float32)\n    raise ValueError('camera unplugged')\n"
    )
    out = tmp_path / "g.json"
    _one_error(cli("calibrate", digits.onnx, "--data", "gens:ok", "-o", out, *FAST, cwd=tmp_path), "--trust-code")
    _one_error(cli("calibrate", digits.onnx, "--data", "gens:boom", "-o", out, "--trust-code", *FAST,
                   cwd=tmp_path),
               "ValueError", "camera unplugged")
    assert not out.exists()
    r = cli("calibrate", digits.onnx, "--data", "gens:ok", "-o", out, "--trust-code", *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # four samples are too few for a 99.99th percentile or a 2048-bin KL search: said, not hidden
    warnings = [line for line in r.stderr_lines if line.startswith("warning:")]
    assert any("percentile" in w and "their max" in w for w in warnings)
    assert any(w.startswith("warning: entropy") for w in warnings)
    assert CalibrationTable.load(out).samples == 4
