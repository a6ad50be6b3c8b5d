"""Each bad input: one stderr line naming the problem, non-zero exit, nothing left behind."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


class _Eig(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.eigvals(x).real


@pytest.fixture(scope="module")
def bad_files(digits, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "text.onnx").write_text("this is not a model\n")
    data = digits.onnx.read_bytes()
    (d / "truncated.onnx").write_bytes(data[: len(data) // 3])
    ts = digits.torchscript.read_bytes()
    (d / "corrupt.pt").write_bytes(ts[: len(ts) // 2])
    torch.save(digits.module, d / "pickled.pt")
    torch.save(digits.module.state_dict(), d / "state_dict.pt")
    torch.jit.save(torch.jit.trace(_Eig(), torch.randn(3, 3)), str(d / "eig.pt"))
    (d / "random.pt2").write_bytes(os.urandom(4096))
    with zipfile.ZipFile(d / "traversal.pt", "w") as z:
        z.writestr("m/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("../../evil.txt", b"x")
    (d / "folder").mkdir()
    return d


CASES = {
    # name: (model, extra args, words the one error line must contain)
    "missing path": ("nope.pt", [], ["nope.pt", "no such file"]),
    "a directory": ("folder", [], ["folder", "directory"]),
    "a text file": ("text.onnx", [], ["text.onnx", "text file"]),
    "truncated onnx": ("truncated.onnx", [], ["truncated.onnx", "not a readable ONNX"]),
    "corrupt zip": ("corrupt.pt", [], ["corrupt.pt", "corrupt zip"]),
    "random bytes .pt2": ("random.pt2", [], ["random.pt2", "ONNX"]),
    "zip path traversal": ("traversal.pt", [], ["traversal.pt", "outside the archive"]),
    "pickle without trust": ("pickled.pt", ["--input-shape", "x:1x1x8x8"], ["pickled.pt", "--trust-pickle"]),
    "state_dict": ("state_dict.pt", ["--input-shape", "x:1x1x8x8"], ["state_dict.pt", "state_dict"]),
    "bad --input-shape": ("@ts", ["--input-shape", "x:1xAx8"], ["--input-shape", "expected"]),
    "no shapes for torch": ("@ts", [], ["--input-shape"]),
    "inputs not matching model": ("@ts", ["--input-shape", "x:1x1x8"], ["rejects inputs", "x:1x1x8"]),
    "onnx shape mismatch": ("@onnx", ["--input-shape", "x:1x3x8x8"], ["does not match"]),
    "unknown input name": ("@onnx", ["--input-shape", "y:1x1x8x8"], ["no input of that name"]),
    "export fails": ("eig.pt", ["--input-shape", "x:3x3"], ["eig.pt", "could not handle aten.linalg_eig"]),
    "unknown target": ("@onnx", ["--target", "fpga"], ["unknown target", "fpga"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, bad_files, digits, cli, tmp_path):
    model, extra, words = CASES[case]
    model = {"@ts": digits.torchscript, "@onnx": digits.onnx}.get(model, bad_files / model)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["--target", "ort-cpu"] if "--target" not in extra else []
    r = cli(*args, model, *extra, "-o", out_dir / "m.onnx", cwd=bad_files)
    assert r.returncode != 0
    assert len(r.stderr_lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    assert list(out_dir.iterdir()) == []
    assert not (bad_files.parent / "evil.txt").exists()


def test_existing_output_is_kept_byte_identical(digits, cli, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"precious")
    before = _snapshot(tmp_path)
    r = cli("--target", "ort-cpu", digits.onnx, "-o", out)
    assert r.returncode == 1 and len(r.stderr_lines) == 1 and "--force" in r.stderr
    assert _snapshot(tmp_path) == before
    r = cli("--target", "ort-cpu", digits.onnx, "-o", out, "--force", "-q")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() != b"precious"


def test_unwritable_output_folder(digits, cli, tmp_path):
    for out in ("/sys/m.onnx", str(tmp_path / "missing" / "m.onnx")):
        r = cli("--target", "ort-cpu", digits.onnx, "-o", out)
        assert r.returncode == 1 and len(r.stderr_lines) == 1, r.stderr
        assert out in r.stderr or str(Path(out).parent) in r.stderr


def test_debug_shows_the_traceback(cli, tmp_path):
    r = cli("--target", "ort-cpu", tmp_path / "nope.onnx", "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_usage_error_exits_2(cli):
    assert cli("compile").returncode == 2
    assert cli("compile", "m.onnx", "--no-such-flag").returncode == 2
