"""Distillation building blocks: grids agree bit for bit with the lowering's quantisers, the torch
re-implementations agree with onnxruntime, the ONNX-in-torch runner matches onnxruntime on the zoo."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from dscompile.compiler import qdq
from dscompile.compiler.adaround import SoftRounding
from dscompile.compiler.distill_capture import run_outputs
from dscompile.compiler.distill_ops import LayerOp, attrs
from dscompile.compiler.distill_quant import (
    dequantize,
    group_ids,
    keep_extremes,
    mse_params,
    quantize_rtn,
    rtn_params,
    weight_grid,
)
from dscompile.compiler.distill_torchgraph import TorchGraph
from dscompile.errors import InputError

RNG = np.random.default_rng(0)


def test_per_channel_grid_matches_the_lowering():
    w = RNG.standard_normal((16, 8, 3, 3)).astype(np.float32)
    grid = weight_grid("int8", {"scheme": "int8_per_channel_symmetric", "bits": 8}, "Conv", w.shape)
    ids = group_ids(w.shape, grid)
    s, z = rtn_params(w, ids, grid)
    ref = qdq.symmetric_per_channel(w, 0)
    assert np.array_equal(quantize_rtn(w, s, z, ids, grid), ref.q.astype(np.int32))
    assert np.allclose(s.astype(np.float32), ref.scale)


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_block_grid_matches_matmulnbits(symmetric):
    w = RNG.standard_normal((70, 6)).astype(np.float32)  # [K, N], K not a multiple of the block
    scheme = {"scheme": "int4_block_symmetric" if symmetric else "int4_block_zero_point", "block_size": 32}
    grid = weight_grid("int4_weight", scheme, "MatMul", w.shape)
    ids = group_ids(w.shape, grid)
    s, z = mse_params(w, ids, grid)  # the lowering searches the same clip ratios per block
    mine = dequantize(quantize_rtn(w, s, z, ids, grid), s, z, ids)
    ref = qdq.block_int4(w, 32, symmetric).dequantize()
    assert np.allclose(mine, ref, atol=1e-6)


@pytest.mark.parametrize("scheme", ["int8_per_channel_symmetric", "int4_block_zero_point"])
def test_on_grid_weights_survive_requantisation(scheme):
    """The hand-off: any codes on the (clipped) grid, extremes kept, come back bit for bit."""
    w = RNG.standard_normal((64, 10)).astype(np.float32)
    grid = weight_grid("int4_weight" if "int4" in scheme else "int8", {"scheme": scheme, "bits": 4}, "MatMul", w.shape)
    ids = group_ids(w.shape, grid)
    s, z = mse_params(w, ids, grid)
    lo, hi = grid.qrange
    codes = np.clip(quantize_rtn(w, s, z, ids, grid) + RNG.integers(-1, 2, w.shape), lo, hi)
    codes = keep_extremes(codes, w, s, z, ids, grid)
    on_grid = dequantize(codes, s, z, ids)
    s2, z2 = rtn_params(on_grid, ids, grid)
    assert np.array_equal(quantize_rtn(on_grid, s2, z2, ids, grid), codes)
    if "int4" in scheme:
        assert np.allclose(qdq.block_int4(on_grid, 32, False).dequantize(), on_grid, atol=1e-6)
    else:
        assert np.allclose(qdq.symmetric_per_channel(on_grid, 1, 4).dequantize(), on_grid, atol=1e-6)


def test_soft_rounding_starts_at_the_float_weight():
    w = RNG.standard_normal((8, 4)).astype(np.float32)
    grid = weight_grid("int8", {"bits": 4}, "MatMul", w.shape)
    ids = group_ids(w.shape, grid)
    s, z = rtn_params(w, ids, grid)
    soft = SoftRounding(w, s[ids], z[ids], grid.qrange)
    assert np.allclose(soft().detach().numpy(), w, atol=1e-5)
    hard = soft.q(hard=True).numpy()
    assert np.array_equal(hard, quantize_rtn(w, s, z, ids, grid))  # h >= 0.5 is round-to-nearest at start


def _single_node_model(op: str, x_shape, w_shape, b: bool, **attributes) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray | None]:
    w = RNG.standard_normal(w_shape).astype(np.float32)
    bias = RNG.standard_normal(w_shape[1] if op == "ConvTranspose" else w_shape[0] if op in ("Conv",) else
                               w_shape[0] if attributes.get("transB") else w_shape[-1]).astype(np.float32) if b else None
    inits = [onnx.numpy_helper.from_array(w, "w")] + ([onnx.numpy_helper.from_array(bias, "b")] if b else [])
    node = onnx.helper.make_node(op, ["x", "w"] + (["b"] if b else []), ["y"], name="n", **attributes)
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", 1, list(x_shape))],
                                   [onnx.helper.make_tensor_value_info("y", 1, None)], inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), w, bias


@pytest.mark.parametrize("op,x,w,b,kw", [
    ("Conv", (2, 4, 9, 7), (6, 4, 3, 3), True, {"pads": [1, 0, 2, 1], "strides": [2, 1]}),
    ("Conv", (1, 4, 8, 8), (8, 2, 3, 3), False, {"group": 2, "dilations": [2, 2], "pads": [2, 1, 1, 2]}),
    ("Conv", (1, 4, 7, 8), (8, 4, 2, 3), False, {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ("Conv", (1, 3, 10), (5, 3, 4), True, {"strides": [3], "auto_pad": "SAME_LOWER"}),
    ("ConvTranspose", (1, 4, 5, 5), (4, 3, 3, 3), True, {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 1]}),
    ("Gemm", (3, 5), (7, 5), True, {"transB": 1, "alpha": 0.5, "beta": 2.0}),
    ("MatMul", (2, 3, 5), (5, 4), False, {}),
])
def test_torch_layer_matches_onnxruntime(op, x, w, b, kw):
    model, weight, bias = _single_node_model(op, x, w, b, **kw)
    xv = RNG.standard_normal(x).astype(np.float32)
    ref = run_outputs(model, [{"x": xv}])[0][0]
    layer = LayerOp(op, attrs(model.graph.node[0]))
    got = layer.forward(torch.from_numpy(xv), torch.from_numpy(weight), None if bias is None else torch.from_numpy(bias))
    assert got.shape == ref.shape
    assert np.allclose(got.numpy(), ref, atol=1e-4)


@pytest.mark.parametrize("zoo_name", ["digits", "transformer"])
def test_torch_graph_runs_the_zoo_like_onnxruntime(zoo_name, request):
    m = request.getfixturevalue(zoo_name)
    model = onnx.load(str(m.onnx))
    name = model.graph.input[0].name
    feeds = [{name: m.test_x[i:i + 1]} for i in range(4)]
    ref = run_outputs(model, feeds)
    tg = TorchGraph(model)
    for feed, r in zip(feeds, ref, strict=True):
        out, _ = tg({k: torch.from_numpy(v) for k, v in feed.items()})
        assert np.allclose(out[0].detach().numpy(), r[0], atol=1e-4)


def test_torch_graph_names_what_it_cannot_train_through():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 4] y) { y = Hardmax(x) }
    """)
    with pytest.raises(InputError, match="Hardmax"):
        TorchGraph(model)
