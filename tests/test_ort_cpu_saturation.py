"""int8 weight bits per layer on ort-cpu: measured where the CPU's kernels saturate, honoured from the plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dscompile.compiler.capabilities import INT8
from dscompile.compiler.ingest import IngestOptions, ingest
from dscompile.compiler.layers import find_layers
from dscompile.compiler.normalize import prepared
from dscompile.targets.ort_cpu_isa import REDUCED_BITS, int8_weight_bits
from dscompile.targets.ort_cpu_qdq import Range
from dscompile.targets.ort_cpu_saturation import layer_errors, reduced_layers

SATURATES = int8_weight_bits(this_cpu=True) != 8
needs_saturation = pytest.mark.skipif(not SATURATES, reason="this CPU accumulates uint8 x int8 in int32 (VNNI or Arm): nothing saturates")
FIRST_CONV = "node_Conv_18"  # the digits CNN's first conv: 8x8 inputs in [0, 1], uint8 codes up to 255


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bits")


@pytest.fixture(scope="module")
def plan(cli, work, digits, digits_npy) -> dict:
    r = cli("plan", digits.onnx, "--calib", digits_npy, "--budget", "kl=1", "-o", work / "plan.json", "-q")
    assert r.returncode == 0, r.stderr
    return json.loads((work / "plan.json").read_text())


def _int8_codes(path: Path) -> dict[str, np.ndarray]:
    """Each int8 weight initializer of a built model, by name."""
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.data_type == onnx.TensorProto.INT8}


def _first_conv_codes(path: Path) -> np.ndarray:
    m = onnx.load(str(path))
    conv = next(n for n in m.graph.node if n.op_type in ("Conv", "QLinearConv") and n.name.startswith(FIRST_CONV))
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == conv.input[1])
    return _int8_codes(path)[dq.input[0]]


@needs_saturation
def test_the_probe_finds_the_saturating_layer_and_only_it(digits):
    g = prepared(ingest(Path(digits.onnx), IngestOptions()).graph)
    layers = find_layers(g)
    weighted = [lay for lay in layers if lay.weights]
    precisions = {lay.name: INT8 for lay in weighted}
    x = digits.calib[:8]
    ranges = {}
    feeds = [{"x": x[i : i + 1]} for i in range(len(x))]
    from dscompile.compiler.distill_capture import prefix, with_outputs
    from dscompile.compiler.runtime import ort_session

    names = sorted({t for lay in weighted for t in (*lay.inputs, *lay.outputs, *lay.internal)} - {"x"})
    sess = ort_session(with_outputs(prefix(g.model, names), names), optimize=False)
    values = [dict(zip(names, sess.run(names, f), strict=True)) | f for f in feeds]
    for t in [*names, "x"]:
        v = np.concatenate([d[t].ravel() for d in values])
        ranges[t] = Range(float(min(v.min(), 0)), float(max(v.max(), 0)))
    errors = layer_errors(g.model, layers, precisions, ranges, feeds)
    assert set(errors) == {lay.name for lay in weighted}
    reduced = reduced_layers(errors)
    assert FIRST_CONV in reduced and len(reduced) < len(errors)
    assert errors[FIRST_CONV][8] > 20 * errors[FIRST_CONV][REDUCED_BITS]  # clipped pair sums, not rounding


@needs_saturation
def test_plan_gives_the_saturating_conv_7_bit_weights_and_compile_gains_from_it(cli, digits, digits_npy, plan, tmp_path):
    layer = next(lp for lp in plan["layers"] if lp["name"] == FIRST_CONV)
    assert layer["weights"]["int8_bits"] == REDUCED_BITS and "saturate" in layer["reason"]
    err = layer["weights"]["measured_error"]
    assert err[str(REDUCED_BITS)] < err["8"]
    kept = [lp for lp in plan["layers"] if lp["weights"].get("int8_bits") == 8 and "measured_error" in lp["weights"]]
    assert kept, "layers that do not saturate keep 8 bits"

    cosines = {}
    for bits in (REDUCED_BITS, 8):
        edited = json.loads(json.dumps(plan))
        first = next(lp for lp in edited["layers"] if lp["name"] == FIRST_CONV)
        first["precision"], first["weights"]["int8_bits"] = "int8", bits  # the plan may keep it fp32: not faster
        (tmp_path / f"p{bits}.json").write_text(json.dumps(edited))
        out = tmp_path / f"q{bits}.onnx"
        r = cli("build", digits.onnx, "--plan", tmp_path / f"p{bits}.json", "--calib", digits_npy, "-o", out, "--json")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        cosines[bits] = report["fidelity"]["cosine"]
        assert np.abs(_first_conv_codes(out)).max() == 2 ** (bits - 1) - 1
        if bits == REDUCED_BITS:
            assert FIRST_CONV in report["int8_weights"]
    assert cosines[REDUCED_BITS] > cosines[8], cosines


def test_build_honours_hand_edited_weight_bits_and_rejects_bad_ones(cli, digits, digits_npy, plan, tmp_path):
    edited = json.loads(json.dumps(plan))
    convs = [lp for lp in edited["layers"] if lp["op"] == "Conv"]
    for lp in convs:
        lp["precision"], lp["weights"] = "int8", {"scheme": "int8_per_channel_symmetric", "bits": 8, "int8_bits": 6}
    (tmp_path / "six.json").write_text(json.dumps(edited))
    out = tmp_path / "six.onnx"
    r = cli("build", digits.onnx, "--plan", tmp_path / "six.json", "--calib", digits_npy, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    assert np.abs(_first_conv_codes(out)).max() == 31

    convs[0]["weights"]["int8_bits"] = 9
    (tmp_path / "nine.json").write_text(json.dumps(edited))
    r = cli("build", digits.onnx, "--plan", tmp_path / "nine.json", "--calib", digits_npy, "-o", tmp_path / "nine.onnx")
    assert r.returncode != 0 and "int8_bits 9 is not an integer from 2 to 8" in r.stderr, r.stderr
    assert len([ln for ln in r.stderr_lines if ln.startswith("dscompile: error:")]) == 1
    assert not (tmp_path / "nine.onnx").exists()
