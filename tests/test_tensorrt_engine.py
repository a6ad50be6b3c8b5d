"""In-process engine build with TensorRT's Python API: runs only where ``tensorrt`` imports (a Jetson, or a
host with an NVIDIA GPU and TensorRT). No TensorRT exists for this CI machine, and none is faked."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None,
    reason="tensorrt does not import here (no NVIDIA GPU/TensorRT on this machine); "
           "install dscompile[tensorrt] on a Jetson or a CUDA host to run the engine build",
)


def test_build_engine_in_process(cli, digits, tmp_path):
    calib = tmp_path / "calib.npy"
    np.save(calib, digits.calib[:64])
    out = tmp_path / "orin"
    r = cli("--target", "jetson-orin", digits.onnx, "--calib", calib, "--build", "-o", out)
    assert r.returncode == 0, r.stderr
    assert (out / "model.engine").stat().st_size > 0 and (out / "timing.cache").stat().st_size > 0
    engine = json.loads((out / "report.json").read_text())["tensorrt"]["engine"]
    assert engine["built"] and engine["where"].startswith("here")


def test_parser_error_names_the_node(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from dscompile.errors import InputError
    from dscompile.targets.tensorrt_engine import build_engine
    from dscompile.targets.tensorrt_script import TrtexecJob

    node = helper.make_node("Unique", ["x"], ["y"], name="dedupe")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    path = tmp_path / "unique.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(InputError, match="dedupe"):
        build_engine(path, tmp_path / "e.engine", tmp_path / "t.cache", TrtexecJob())
