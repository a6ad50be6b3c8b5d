"""The snapdragon target's build: float conversion (cached), plan lowering, report notes.

Conversion and the tensor map depend only on the model, so they are kept in
memory per model hash: the DMPQ repair loop and repeated builds reuse them,
and only quantization (fast) runs per plan.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

from dscompile.calibration.table import CalibrationTable
from dscompile.compiler.capabilities import FP32, INT8, TargetCapabilities
from dscompile.compiler.graph import ModelGraph
from dscompile.compiler.layers import find_layers
from dscompile.compiler.normalize import prepared
from dscompile.compiler.plan import LayerPlan, QuantPlan, needed_tensors, plan_ranges
from dscompile.compiler.ranges import activation_range
from dscompile.compiler.samples import synthetic_feeds
from dscompile.profiles.litert_runner import IO_METADATA
from dscompile.targets.base import Artifact, BuildOptions, describe_files
from dscompile.targets.tflite_assign import OpAssignment, assign_ops
from dscompile.targets.tflite_compat import compat_report
from dscompile.targets.tflite_convert import FloatTflite, convert_onnx
from dscompile.targets.tflite_flatbuffer import TflGraph, attach_metadata, read_graph
from dscompile.targets.tflite_quantize import build_recipe, qsvs, quantize
from dscompile.targets.tflite_ranges import float_ranges, softmax_floors
from dscompile.targets.tflite_tensor_map import TensorMap, build_map

log = logging.getLogger("dscompile")
MODEL_FILE = "model.tflite"
PROBES = 2
_CACHE: OrderedDict[str, FloatBuild] = OrderedDict()
_CACHE_SIZE = 4


@dataclass(frozen=True)
class FloatBuild:
    float: FloatTflite
    tmap: TensorMap
    graph: TflGraph



def float_build(g: ModelGraph, seed: int = 0) -> FloatBuild:
    """The verified float conversion of ``g`` (cached per model and input shapes)."""
    key = f"{g.sha256}:{[s.to_json() for s in g.inputs]}:{seed}"
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    log.info("converting to TFLite with onnx2tf (offline)")
    ft = convert_onnx(g.model, g.inputs)
    feeds = synthetic_feeds(g.inputs, PROBES, seed + 7, g.model)
    tmap = build_map(g.model, ft.model, feeds, ft.inputs.channels_last)
    build = FloatBuild(ft, tmap, read_graph(ft.model))
    _CACHE[key] = build
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return build


def default_plan(g: ModelGraph, caps: TargetCapabilities, table: CalibrationTable) -> QuantPlan:
    """Int8 for every layer the menu allows and the table has ranges for (the rest fp32).

    The plan a build without DMPQ would use; ``lower`` itself builds fp32 when
    given no plan (the pipeline's ``--fp32``), so this is asked for explicitly.
    """
    outs = {o.name for o in g.model.graph.output}
    consts = {t.name for t in g.model.graph.initializer}
    act = {"method": caps.activations.method, "symmetric": caps.activations.symmetric}
    layers = []
    for lay in find_layers(g):
        precision, reason = FP32, caps.reasons.get(lay.op, f"{lay.op}: int8 not on the snapdragon menu")
        if INT8 in caps.layer_menu(lay):
            missing = [t for t in needed_tensors(lay, outs) if t not in consts and t not in table.tensors]
            precision, reason = (FP32, f"no calibrated range for {missing[0]!r}") if missing else (INT8, "default: int8 (no plan given)")
        layers.append(LayerPlan(lay.name, lay.nodes, lay.op, precision, lay.module, activations=dict(act), reason=reason))
    return QuantPlan(caps.target, g.sha256, tuple(layers), device=caps.device)


def quantize_plan(
    g: ModelGraph, fb: FloatBuild, plan: QuantPlan, table: CalibrationTable | None, caps: TargetCapabilities,
    samples: Sequence[dict] = (),
) -> tuple[bytes, OpAssignment]:
    """Lower ``plan`` onto the float TFLite: per-op precisions, our ranges, ai-edge-quantizer.

    ``samples`` (calibration feeds, ONNX-named): the float .tflite runs on them to range the
    TFLite tensors the table gives no range (no ONNX twin, or a twin not calibrated);
    without samples those tensors' ops stay float.
    """
    layers = find_layers(g)
    outs = {o.name for o in g.model.graph.output}
    consts = {t.name for t in g.model.graph.initializer}
    static = plan_ranges(plan, layers, table, outs, consts)

    def onnx_range(t: str) -> tuple[float, float] | None:
        if t in static:
            return static[t]
        if table is not None and t in table.tensors:
            return activation_range(table.tensors[t], caps.activations)
        return None

    node_layer = {n: lp.name for lp in plan.layers for n in lp.nodes}
    precision = {lp.name: lp.precision for lp in plan.layers}
    symmetric = {lp.name: bool(lp.activations.get("symmetric", False)) for lp in plan.layers}
    measured = float_ranges(fb.float.model, fb.tmap.io, samples) if plan.layers else {}
    floors = softmax_floors(fb.float.model, fb.tmap.io, samples) if plan.layers else {}
    assignment = assign_ops(fb.graph, fb.tmap, g.model, node_layer, precision, onnx_range, symmetric, measured, floors)
    quantized_ops = {i: p for i, p in assignment.precision.items() if p != FP32}
    recipe = build_recipe(fb.float.model, quantized_ops, assignment.symmetric)
    ranks = {t.name: len(t.shape) for t in fb.graph.tensors}
    return quantize(fb.float.model, recipe, qsvs(assignment.ranges, ranks)), assignment


def lower(target: Any, graph: ModelGraph, plan: QuantPlan | None, table: CalibrationTable | None,
          stage: Path, options: BuildOptions) -> Artifact:
    from dscompile.targets.tflite import DEFAULT_DEVICE, snapdragon_profile
    from dscompile.targets.tflite_remote import remote_request, time_remote

    device = options.device or DEFAULT_DEVICE
    request = remote_request(options)  # checks the phone before the slow build
    g = prepared(graph)
    fb = float_build(g, options.seed)
    caps = target.capabilities(g, device)
    # The I/O map goes in before quantization: the float flatbuffer keeps its buffers inline, and
    # ai-edge-quantizer carries metadata over (it may write large buffers at offsets past the root).
    tagged = attach_metadata(fb.float.model, IO_METADATA, json.dumps(fb.tmap.io.to_json()).encode())
    fb = replace(fb, float=replace(fb.float, model=tagged))
    model, assignment = fb.float.model, None  # no plan: fp32 (a table alone only verifies, as with --fp32)
    if plan is not None:
        model, assignment = quantize_plan(g, fb, plan, table, caps, options.samples)
    (stage / MODEL_FILE).write_bytes(model)
    built = read_graph(model)
    notes: dict[str, Any] = {
        "tflite": _tflite_notes(fb, built, assignment, len(options.samples)),
        "hexagon": compat_report(built, snapdragon_profile(device), fb.tmap.tflite_to_onnx),
    }
    if request is not None:
        notes["remote"] = time_remote(request, stage / MODEL_FILE)
    files = describe_files(stage, {MODEL_FILE: "model"})
    return Artifact(target.name, device, stage, MODEL_FILE, files, notes)


def _tflite_notes(fb: FloatBuild, built: TflGraph, assignment: OpAssignment | None, samples: int) -> dict[str, Any]:
    notes: dict[str, Any] = {
        "converter": fb.float.converter,
        "quantizer": f"ai-edge-quantizer {version('ai-edge-quantizer')}" if assignment else None,
        "inputs": {"channels_last": list(fb.float.inputs.channels_last), "kept_layout": list(fb.float.inputs.keep_shape)},
        "gelu_fused_to_builtin": fb.float.gelu_fused,
        "erf_built_from_builtins": fb.float.erf_approximated,
        "network_attempts_refused": list(fb.float.network_attempts),
        "tensor_map": {**fb.tmap.summary(), "onnx_to_tflite": fb.tmap.onnx_to_tflite},
        "ops": len(built.ops),
    }
    if assignment is not None:
        notes["op_precisions"] = assignment.counts()
        notes["kept_float_no_range"] = assignment.kept_float
        notes["softmax_input_floors"] = {
            "tensors": {n: {"range": list(a), "cut_to": list(b)} for n, (a, b) in assignment.floored.items()},
            "why": "a SOFTMAX input's range starts SOFTMAX_SPAN below the smallest row maximum seen on the float "
            ".tflite over the calibration samples: an additive attention mask below it would take the whole "
            "quantized grid (targets/tflite_ranges.py)",
        }
        notes["ranges_measured_on_float_tflite"] = {
            "tensors": len(assignment.measured), "samples": samples,
            "why": "TFLite tensors the calibration table gives no range (no ONNX twin, or a twin not calibrated): "
            "min/max over the calibration samples on the float .tflite" if samples
            else "no calibration samples in this build: tensors the calibration table does not range stay float",
        }
    return notes
