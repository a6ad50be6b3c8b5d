"""Broken inputs for the bad-input catalogue, built once per run (small: digits-sized)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]


def _relu_chain(nodes: list, name: str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    return helper.make_model(helper.make_graph(nodes, name, [x], [y]), opset_imports=[helper.make_opsetid("", 17)])


def _tiny_gemm() -> onnx.ModelProto:
    """Another model: y = x W + b, for plans and tables that belong elsewhere."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(3, np.float32), "b")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")], "tiny", [x], [y], [w, b])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _external_outside(folder: Path) -> None:
    """A model whose initializer's external data points at ../outside.bin."""
    (folder.parent / "outside.bin").write_bytes(np.ones(12, np.float32).tobytes())
    m = _tiny_gemm()
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../outside.bin"), ("offset", "0"), ("length", "48")):
        e = w.external_data.add()
        e.key, e.value = k, v
    folder.mkdir()
    (folder / "model.onnx").write_bytes(m.SerializeToString())


def build(d: Path, digits, calib: np.ndarray) -> None:
    onnx_bytes = digits.onnx.read_bytes()
    (d / "empty.onnx").write_bytes(b"")
    (d / "text.onnx").write_text("this is not a model\n")
    (d / "truncated.onnx").write_bytes(onnx_bytes[: len(onnx_bytes) // 2])
    rnd = np.random.default_rng(7)
    for ext in ("onnx", "pt", "pt2"):
        (d / f"random.{ext}").write_bytes(rnd.bytes(4096))
    ts = digits.torchscript.read_bytes()
    (d / "truncated.pt").write_bytes(ts[: len(ts) // 2])
    with zipfile.ZipFile(d / "traversal.pt", "w") as z:
        z.writestr("m/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("../../evil.txt", b"x")
    relu = helper.make_node
    onnx.save(_relu_chain([relu("Relu", ["ghost"], ["y"], name="r")], "dangling"), d / "dangling.onnx")
    onnx.save(_relu_chain([relu("Add", ["x", "b"], ["a"], name="r1"), relu("Relu", ["a"], ["b"], name="r2"),
                           relu("Identity", ["a"], ["y"], name="r3")], "cycle"), d / "cycle.onnx")
    _external_outside(d / "ext")
    onnx.save(_tiny_gemm(), d / "other.onnx")
    x = calib[:24]
    np.savez(d / "nan.npz", x=np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x).astype(np.float32))
    np.savez(d / "inf.npz", x=np.where(np.arange(x.size).reshape(x.shape) == 5, np.inf, x).astype(np.float32))
    np.savez(d / "empty.npz", x=x[:0])
    np.savez(d / "wrong_shape.npz", x=x[:, :, :4, :4])
    np.savez(d / "wrong_name.npz", y=x)
    np.savez(d / "wrong_dtype.npz", x=x.astype(np.int64))
    (d / "truncated.npz").write_bytes((d / "nan.npz").read_bytes()[:200])
    (d / "images").mkdir()
    for i in range(3):
        (d / "images" / f"img{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rnd.bytes(64))
    (d / "empty_dir").mkdir()
    (d / "notjson.json").write_text("{ this is not json")
    (d / "bad.toml").write_text("[batch\ntargets = ")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    np.savez(d / "other_data.npz", x=np.random.default_rng(0).standard_normal((24, 4)).astype(np.float32))
    for argv in (["plan", "other.onnx", "--calib", "other_data.npz", "--device", "raspberry-pi-5",
                  "--verify-samples", "4", "--sensitivity-samples", "2", "-q", "-o", "other_plan.json"],
                 ["calibrate", "other.onnx", "--data", "other_data.npz", "--method", "minmax", "-q",
                  "-o", "other_calib.json"]):
        subprocess.run([sys.executable, "-m", "dscompile", *argv], cwd=d, env=env, check=True, capture_output=True)
