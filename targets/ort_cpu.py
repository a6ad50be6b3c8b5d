"""ONNX Runtime CPU target: an ONNX model that onnxruntime's CPU provider runs.

Without a plan the simplified FP32 model is written. With one, each layer is
lowered at its planned precision (``ort_cpu_qdq.py``: QDQ for the integer
kernels, DynamicQuantizeMatMul, MatMulNBits); costs come from ``ort_cpu_cost.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from dscompile.calibration.table import CalibrationTable
from dscompile.compiler.capabilities import (
    FP16,
    FP32,
    INT4_WEIGHT,
    INT8,
    INT8_DYNAMIC,
    INT8_WEIGHT,
    ActivationScheme,
    Layer,
    PrecisionMenu,
    TargetCapabilities,
)
from dscompile.compiler.graph import ModelGraph
from dscompile.compiler.layers import ACT_MATMUL, CONTROL_FLOW, INTEGER_OPS, RECURRENT, find_layers
from dscompile.compiler.normalize import prepared
from dscompile.compiler.onnx_io import save_model
from dscompile.compiler.plan import QuantPlan, plan_ranges
from dscompile.compiler.plan import int8_weight_bits as planned_bits
from dscompile.errors import InputError
from dscompile.profiles.runners import OrtRunner
from dscompile.targets.base import Artifact, BuildOptions, describe_files
from dscompile.targets.ort_cpu_isa import REDUCED_BITS, int8_weight_bits, weight_bits_note
from dscompile.targets.ort_cpu_qdq import INT4_BLOCK, Range, check_layer, lower_qdq

MODEL_FILE = "model.onnx"
THIS_CPU = "this-cpu"
SATURATION_NOTE = (f"int8 weights at {REDUCED_BITS} bits (weights.int8_bits): this CPU's uint8 x int8 kernels saturate, "
                   "and the layer measured closer to FP32 with them (weights.measured_error)")
log = logging.getLogger("dscompile")

_MATMUL_MENU = (FP32, INT8, INT8_DYNAMIC, INT4_WEIGHT, FP16)
MENU = PrecisionMenu(
    by_op={
        "Conv": (FP32, INT8, FP16), "ConvTranspose": (FP32, INT8, FP16),
        "MatMul": _MATMUL_MENU, "Gemm": _MATMUL_MENU, ACT_MATMUL: (FP32, INT8),
        "Gather": (FP32, INT8_WEIGHT, INT4_WEIGHT),
        **{op: (FP32, INT8) for op in INTEGER_OPS},
    },
    default=(FP32,),
    forced_only=(FP16,),
)
# Why some layers stay fp32 on this target (reported in the plan).
REASONS = {
    "GRU": "onnxruntime has no quantised GRU kernel: kept fp32",
    "RNN": "onnxruntime has no quantised RNN kernel: kept fp32",
    "LSTM": "kept fp32 (DynamicQuantizeLSTM is not lowered by dscompile yet)",
    **{op: f"{op} subgraph kept fp32 (control flow is not quantised)" for op in CONTROL_FLOW},
}
assert all(op in RECURRENT or op in CONTROL_FLOW for op in REASONS)


def _non_negative(node, weights: dict) -> bool:
    """Relu, Sigmoid, or a Clip whose lower bound is a constant >= 0 (Relu6): the output never goes below 0."""
    if node.op_type in ("Relu", "Sigmoid"):
        return True
    if node.op_type != "Clip" or len(node.input) < 2 or node.input[1] not in weights:
        return False
    from onnx import numpy_helper

    return float(numpy_helper.to_array(weights[node.input[1]])) >= 0



def _int8_kinds(plan: QuantPlan, layers: list[Layer]) -> dict[str, str]:
    """The int8 precision to measure each weighted layer at: its planned one where that is int8 or
    int8_dynamic, else int8 where the plan measured its sensitivity (repair or a hand edit may move it there)."""
    weighted = {lay.name for lay in layers if lay.weights}
    out = {}
    for lp in plan.layers:
        if lp.name not in weighted:
            continue
        if lp.precision in (INT8, INT8_DYNAMIC):
            out[lp.name] = lp.precision
        elif INT8 in lp.sensitivity:
            out[lp.name] = INT8
    return out


def _probe_ranges(plan: QuantPlan, kinds: dict[str, str], layers: list[Layer], table, graph: ModelGraph) -> dict:
    """Ranges of the tensors each layer reads and writes at its probed precision (layers lacking one: none)."""
    outs = {o.name for o in graph.model.graph.output}
    consts = {t.name for t in graph.model.graph.initializer}
    ranges = {}
    for name, p in kinds.items():
        one = replace(plan, layers=tuple(replace(lp, precision=p) for lp in plan.layers if lp.name == name))
        try:
            ranges.update(plan_ranges(one, layers, table, outs, consts))
        except InputError:
            continue
    return {t: Range(*r) for t, r in ranges.items()}


def _int4_matmuls(layers: list[Layer], precisions: dict[str, str]) -> bool:
    return any(precisions.get(lay.name) == INT4_WEIGHT and lay.op != "Gather" for lay in layers)


def _int4_hessians(model, layers: list[Layer], options: BuildOptions) -> dict:
    """Input Hessians of the layers' MatMul/Gemm inputs, from the build's calibration samples (none: {})."""
    if not options.samples or not options.refit_weights:
        return {}
    from dscompile.compiler.gptq import layer_hessians, matmul_inputs

    # every MatMul's input, not only the int4 ones: the same set as the sensitivity pass, so one capture
    return layer_hessians(model, matmul_inputs(model, [lay.nodes[0] for lay in layers]), options.samples, options.threads)


class OrtCpuTarget:
    name = "ort-cpu"
    description = "ONNX Runtime, CPU execution provider (x86-64 / Arm64)"
    output_kind = "file"
    suffix = ".onnx"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def default_device(self) -> str:
        return THIS_CPU

    def capabilities(self, graph: ModelGraph, device: str, threads: int | None = None) -> TargetCapabilities:
        from dscompile.targets.ort_cpu_cost import OrtCpuCost

        g = prepared(graph)
        layers = find_layers(g)
        weights = {t.name: t for t in g.model.graph.initializer}
        nodes = {n.name: n for n in g.model.graph.node}

        def check(layer: Layer, precision: str) -> str | None:
            return check_layer(layer, precision, weights, nodes)

        menus = {lay.name: tuple(p for p in MENU.for_op(lay.op) if p == FP32 or check(lay, p) is None) for lay in layers}
        profile = None
        if device and device != THIS_CPU:
            from dscompile.profiles.devices import get_device

            profile = get_device(device)
            if profile.target != self.name:
                raise InputError(f"device {device!r} is for target {profile.target}, not {self.name}")

        non_negative = {o for n in g.model.graph.node if _non_negative(n, weights) for o in n.output}

        def lower(assign: dict[str, str]):
            # Stand-in ranges for timing only. A Relu/Sigmoid output gets a range starting at 0, as a
            # calibrated one would: onnxruntime folds a Relu into QLinearConv only when the zero point
            # is the range's bottom, so (-1, 1) there times Conv -> DQ -> float Relu -> Q instead.
            ranges = {t: Range(0.0, 1.0) if t in non_negative else Range(-1.0, 1.0)
                      for lay in layers for t in (*lay.inputs, *lay.outputs, *lay.internal)}
            return lower_qdq(g.model, layers, assign, ranges)

        cost = OrtCpuCost(g.model, layers, menus, lower, device or THIS_CPU, profile, threads, g.inputs)
        from dscompile.compiler.capabilities import DEFAULT_NUMERICS, Numerics

        numerics = dict(DEFAULT_NUMERICS)
        # GPTQ needs calibration inputs: the sensitivity pass has them, and so does every build that
        # gets BuildOptions.samples (compile --calib DATA); a build from a calib.json rounds to nearest
        numerics[INT4_WEIGHT] = Numerics("int4_block", "none", block_size=INT4_BLOCK, weight_symmetric=False,
                                         rounding="gptq")
        return TargetCapabilities(
            self.name, device or THIS_CPU, MENU, cost, ActivationScheme(method="minmax", symmetric=False),
            numerics, check, REASONS,
        )

    def lower(
        self, graph: ModelGraph, plan: QuantPlan | None, table: CalibrationTable | None,
        stage: Path, options: BuildOptions,
    ) -> Artifact:
        g = prepared(graph)
        model = g.model
        notes: dict = {}
        if plan is not None:
            layers = find_layers(g)
            precisions = {lp.name: lp.precision for lp in plan.layers}
            outs = {o.name for o in model.graph.output}
            consts = {t.name for t in model.graph.initializer}
            ranges = {t: Range(*r) for t, r in plan_ranges(plan, layers, table, outs, consts).items()}
            int4 = _int4_matmuls(layers, precisions)
            hessians = _int4_hessians(g.model, layers, options) if int4 else {}
            bits = {lp.name: int(planned_bits(lp)) for lp in plan.layers if lp.precision in (INT8, INT8_DYNAMIC)}
            model = lower_qdq(g.model, layers, precisions, ranges, hessians, weight_bits=bits)
            exact = int8_weight_bits(this_cpu=(options.device or THIS_CPU) == THIS_CPU)
            note = weight_bits_note(exact, {name: b for name, b in bits.items() if b != 8})
            if bits and note:
                notes["int8_weights"] = note
            if int4:
                notes["int4_rounding"] = (f"gptq (input Hessians from {len(options.samples)} calibration samples)"
                                          if hessians else "as distilled" if not options.refit_weights
                                          else "nearest (no calibration samples to fit GPTQ to)")
        files = save_model(model, stage / MODEL_FILE)
        roles = {f: ("model" if f == MODEL_FILE else "other") for f in files}
        return Artifact(self.name, options.device or THIS_CPU, stage, MODEL_FILE, describe_files(stage, roles), notes)

    def refine_plan(self, graph: ModelGraph, plan: QuantPlan, table: CalibrationTable | None,
                    feeds: Sequence[dict], threads: int | None = None) -> QuantPlan:
        """Fewer weight bits on the int8 layers this CPU's saturating kernels hurt, measured layer by
        layer (``ort_cpu_saturation.py``); the plan as it is where the deployment CPU is another one
        or computes int8 exactly."""
        if plan.device not in ("", THIS_CPU) or int8_weight_bits(this_cpu=True) == 8 or not feeds:
            return plan
        from dscompile.targets.ort_cpu_saturation import layer_errors, reduced_layers

        g = prepared(graph)
        layers = find_layers(g)
        kinds = _int8_kinds(plan, layers)
        errors = layer_errors(g.model, layers, kinds, _probe_ranges(plan, kinds, layers, table, g), feeds, threads)
        reduced = reduced_layers(errors)
        updates = {name: {"int8_bits": REDUCED_BITS if name in reduced else 8,
                          "measured_error": {str(b): float(f"{v:.4g}") for b, v in e.items()}}
                   for name, e in errors.items()}
        log.info("int8 weights: %d of %d layers measured closer to FP32 with %d-bit codes on this CPU "
                 "(no VNNI: its uint8 x int8 kernels saturate)", len(reduced), len(errors), REDUCED_BITS)
        plan = plan.with_weights({k: v for k, v in updates.items() if k not in reduced})
        return plan.with_weights({k: v for k, v in updates.items() if k in reduced}, SATURATION_NOTE)

    def runner(self, artifact: Artifact, threads: int | None = None) -> OrtRunner:
        return OrtRunner(artifact.primary_path, threads)


TARGET = OrtCpuTarget()
