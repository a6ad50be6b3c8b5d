"""A model past protobuf's 2 GB limit, built at run time with its weights in an external-data file.

Shared by benchmarks/large_model.py (the measurement) and tests/reliability/test_large_model.py (opt-in).
The weights are written one matrix at a time, so building it never holds them all in memory; each matrix
starts on a page boundary of the data file, as onnx and dscompile write them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from tests.reliability.rss import dscompile_env, peak_rss

ALIGN = 4096


def build_large_model(folder: Path, width: int = 8192, layers: int = 9, seed: int = 0) -> tuple[Path, int]:
    """``folder/model.onnx`` + ``model.onnx.data``: ``layers`` x (MatMul width x width, Tanh). Returns
    (model path, weight bytes). The defaults give 9 x 256 MiB = 2.25 GiB of float32 weights."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = folder / "model.onnx.data"
    inits, nodes, offset = [], [], 0
    with open(data, "wb") as f:
        for i in range(layers):
            w = rng.standard_normal((width, width), dtype=np.float32)
            w *= np.float32(1.5 / np.sqrt(width))  # keeps tanh away from saturation layer after layer
            f.seek(offset)
            f.write(w.tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=(width, width))
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(w.nbytes))):
                e = t.external_data.add()
                e.key, e.value = key, value
            inits.append(t)
            src = "x" if i == 0 else f"h{i - 1}"
            nodes.append(helper.make_node("MatMul", [src, f"w{i}"], [f"m{i}"], name=f"fc{i}"))
            nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i}" if i < layers - 1 else "y"], name=f"act{i}"))
            offset += -(-w.nbytes // ALIGN) * ALIGN
            del w
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])
    graph = helper.make_graph(nodes, "large", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path, layers * width * width * 4


def peak_rss_of_compile(model: Path, out: Path, extra: list[str] | None = None) -> tuple[int, float, float, str]:
    """(exit code, peak RSS in bytes, seconds, stderr) of ``dscompile compile --target ort-cpu`` as a child."""
    argv = [sys.executable, "-m", "dscompile", "compile", "--target", "ort-cpu", str(model), "--verify-samples", "2",
            "-o", str(out), *(extra or [])]
    return peak_rss(argv, env=dscompile_env())
