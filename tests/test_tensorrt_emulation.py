"""DMPQ's emulator predicts what the jetson-orin lowering computes, layer by layer (zoo models).

Sensitivity builds one emulator with every precision of each layer's menu behind gates. A layer
whose input is gated twice (its FP16 gate, then its INT8 gate; or the static output gate of the
layer before it) once lost the second gate: the INT8 input quantization was never emulated and
MiniLM's key projections measured 1000x less sensitive than their build. Here each layer alone at
INT8 / INT4 weights, emulated that way, must match the Q/DQ model the target writes for it.
"""

from __future__ import annotations

import numpy as np
import pytest

from dscompile.calibration.collect import calibrate
from dscompile.compiler.capabilities import FP32, INT4_WEIGHT, INT8
from dscompile.compiler.emulate import build_emulator
from dscompile.compiler.ingest import IngestOptions, ingest
from dscompile.compiler.layers import find_layers
from dscompile.compiler.plan import LayerPlan, QuantPlan, needed_tensors
from dscompile.compiler.ranges import full_range_tensors, table_ranges
from dscompile.compiler.sensitivity import _cases, _Runner, nmse
from dscompile.planning import prepared
from dscompile.targets.tensorrt import TARGET, verification_session
from dscompile.targets.tensorrt_qdq import lower_plan

DEVICE = "jetson-agx-orin-64gb"


def _error(refs: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    """Squared output error relative to the output's power (for logits too: the KL of near-certain
    classifications is all rounding noise)."""
    return float(np.mean([nmse(r[0], g[0]) for r, g in zip(refs, got, strict=True)]))


def _compare(zoo, name: str, precision: str) -> list[tuple[str, float, float]]:
    """(layer, emulated error, lowered error) for every layer offering ``precision``."""
    graph = prepared(ingest(zoo.onnx, IngestOptions()).graph)
    feeds = [{name: zoo.calib[i : i + 1]} for i in range(24)]
    table = calibrate(graph.model, feeds[:16], model_sha256=graph.sha256, data_sha256="zoo", progress=False)
    caps = TARGET.capabilities(graph, DEVICE)
    layers = find_layers(graph)
    outs = {o.name for o in graph.model.graph.output}
    ranges = table_ranges(table, {t for lay in layers for t in needed_tensors(lay, outs)}, caps.activations,
                          full_range_tensors(graph.model, caps.activations))
    cases, _ = _cases(layers, caps, ranges)
    emu = build_emulator(graph.model, layers, {lay.name: [caps.numerics[p] for p in ps] for lay, ps in cases},
                         ranges, caps.activations.symmetric)
    held = feeds[16:]
    runner = _Runner(emu, held, 1)
    refs = runner.run({})
    rows = []
    for lay, ps in cases:
        if precision not in ps:
            continue
        emulated = _error(refs, runner.run(emu.case_feed(lay, caps.numerics[precision])))
        plan = QuantPlan("jetson-orin", graph.sha256, tuple(
            LayerPlan(x.name, x.nodes, x.op, precision if x is lay else FP32,
                      weights={"block_size": caps.numerics[precision].block_size}) for x in layers))
        model, _ = lower_plan(graph, plan, table)
        sess = verification_session(model, 1)
        lowered = _error(refs, [sess.run(None, f) for f in held])
        rows.append((lay.name, emulated, lowered))
    return rows


@pytest.mark.parametrize(("model", "precision"), [("digits", INT8), ("transformer", INT8), ("transformer", INT4_WEIGHT)])
def test_emulated_sensitivity_matches_the_tensorrt_lowering(model, precision, request):
    zoo = request.getfixturevalue(model)
    rows = _compare(zoo, "x" if model == "digits" else "ids", precision)
    assert len(rows) >= 3, rows
    compared = 0
    for layer, emulated, lowered in rows:
        if max(emulated, lowered) < 1e-9:  # the layer's quantization moves no output
            continue
        # INT8: the same Q/DQ on the same grid (amax / 127); INT4 weights: the build also runs the GEMM
        # in FP16 with an FP16 scale, which the emulator leaves out
        lo, hi = (0.9, 1.1) if precision == INT8 else (0.6, 1.6)
        assert lo * lowered <= emulated <= hi * lowered, (layer, emulated, lowered)
        compared += 1
    assert compared >= 2, rows
