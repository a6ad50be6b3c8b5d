"""Ranges measured on the float .tflite for tensors the calibration table cannot give (real LiteRT).

The zoo transformer's LayerNorm is decomposed by onnx2tf (MEAN, SQUARED_DIFFERENCE,
RSQRT, ...): those tensors have no ONNX twin. Without calibration samples their ops
stay float (tests/test_tflite.py checks that); with them, they get ranges from a
float LiteRT run and are quantized next to int16x8 (next to int8 a normalization stays
float by design), and the model keeps its accuracy.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx2tf")

from dscompile.compiler.capabilities import FP32, INT8, INT16X8  # noqa: E402
from dscompile.compiler.runtime import ort_session  # noqa: E402
from dscompile.targets.base import BuildOptions  # noqa: E402
from dscompile.targets.tflite_flatbuffer import read_graph  # noqa: E402
from dscompile.targets.tflite_lower import float_build, prepared  # noqa: E402
from dscompile.targets.tflite_ranges import float_ranges, measure_ranges  # noqa: E402
from tests.test_tflite import DEVICE, Case, precisions_of, uniform_plan  # noqa: E402


@pytest.fixture(scope="module")
def target():
    from dscompile.targets.base import get_target

    return get_target("snapdragon")


@pytest.fixture(scope="module")
def case(transformer):
    return Case(transformer)


def test_measured_range_is_the_onnx_twins_range(case):
    """A mapped tensor's range from the float .tflite equals its ONNX twin's min/max under onnxruntime."""
    g = prepared(case.graph)
    fb = float_build(g)
    feeds = case.feeds[:24]
    twins = {t: o[0] for t, o in fb.tmap.tflite_to_onnx.items() if o[0] not in {i.name for i in g.model.graph.input}}
    tname, oname = sorted(twins.items())[len(twins) // 2]  # one from the middle of the graph
    got = measure_ranges(fb.float.model, fb.tmap.io, [tname], feeds)[tname]
    from dscompile.targets.tflite_tensor_map import all_intermediates

    full, _ = all_intermediates(g.model)
    sess = ort_session(full, optimize=False)
    values = np.concatenate([sess.run([oname], f)[0].ravel() for f in feeds])
    np.testing.assert_allclose(got, (values.min(), values.max()), rtol=1e-4, atol=1e-5)
    # every float activation is measured, and the run is kept for the next build
    assert set(float_ranges(fb.float.model, fb.tmap.io, feeds)) >= set(fb.tmap.unmapped_tflite)
    assert float_ranges(fb.float.model, fb.tmap.io, feeds) is float_ranges(fb.float.model, fb.tmap.io, feeds)


def test_tensor_without_onnx_twin_gets_a_range_and_its_op_is_quantized(target, case, tmp_path):
    g = prepared(case.graph)
    fb = float_build(g)
    plan = uniform_plan(target, case, INT8)
    builds = {}
    for label, samples in (("without", ()), ("with", tuple(case.feeds[:32]))):
        (tmp_path / label).mkdir()
        art = target.lower(case.graph, plan, case.table, tmp_path / label, BuildOptions(device=DEVICE, samples=samples))
        builds[label] = (art, target.runner(art))
    art, runner = builds["with"]
    tfl = art.notes["tflite"]
    assert tfl["ranges_measured_on_float_tflite"]["samples"] == 32
    # a tensor with no ONNX twin (inside the decomposed LayerNorm) now has a range ...
    rsqrt = next(op for op in fb.graph.ops if op.name == "RSQRT")
    out = fb.graph.tensors[rsqrt.outputs[0]].name
    assert out in fb.tmap.unmapped_tflite
    before = builds["without"][0].notes["tflite"]
    assert "MEAN" in {k["op"] for k in before["kept_float_no_range"]}
    assert precisions_of(builds["without"][0], "RSQRT") == {FP32}
    # ... so nothing is kept float for want of a range; next to int8 the decomposed LayerNorm stays
    # float by design (each int8 stage loses 7-35 %: targets/tflite_assign.py normalization_ops) ...
    assert tfl["kept_float_no_range"] == []
    assert tfl["ranges_measured_on_float_tflite"]["tensors"] > 0
    assert precisions_of(art, "RSQRT") == {FP32} and precisions_of(art, "SQUARED_DIFFERENCE") == {FP32}
    # ... and next to int16x8 it is integer in the built file
    (tmp_path / "16").mkdir()
    art16 = target.lower(case.graph, uniform_plan(target, case, INT16X8), case.table, tmp_path / "16",
                         BuildOptions(device=DEVICE, samples=tuple(case.feeds[:32])))
    assert precisions_of(art16, "RSQRT") == {INT16X8}
    built = read_graph(art16.primary_path.read_bytes())
    rsqrt_built = next(op for op in built.ops if op.name == "RSQRT")
    assert built.tensors[rsqrt_built.outputs[0]].dtype == "int16"
    acc16, _ = case.score(target.runner(art16))
    assert acc16 >= case.fp32_acc - 0.03, acc16
    acc, agree = case.score(runner)
    assert acc >= case.fp32_acc - 0.03, acc
