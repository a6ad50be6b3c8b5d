"""Snapdragon target: a TFLite model for LiteRT on Snapdragon phones (Hexagon NPU via the QNN delegate).

    ONNX --onnx2tf (offline, verified tensor by tensor)--> float .tflite
         --ai-edge-quantizer (our plan, our calibrated ranges)--> .tflite
         --LiteRT interpreter--> verified; Hexagon compatibility report beside it

The TFLite stack (onnx2tf, ai-edge-quantizer, ai-edge-litert, TensorFlow) is
imported only when this target builds or runs something, so dscompile works
without it and ``available()`` says how to install it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

from dscompile.calibration.table import CalibrationTable
from dscompile.compiler.capabilities import (
    DEFAULT_NUMERICS,
    FP16,
    FP32,
    INT4_WEIGHT,
    INT8,
    INT8_DYNAMIC,
    INT8_WEIGHT,
    INT16X8,
    ActivationScheme,
    Numerics,
    PrecisionMenu,
    TargetCapabilities,
)
from dscompile.compiler.graph import ModelGraph
from dscompile.compiler.layers import ACT_MATMUL, CONTROL_FLOW, RECURRENT
from dscompile.compiler.plan import QuantPlan
from dscompile.errors import InputError
from dscompile.profiles.devices import DeviceProfile, get_device
from dscompile.profiles.litert_runner import PIP_LINE, LiteRTRunner
from dscompile.targets.base import Artifact, BuildOptions

DEFAULT_DEVICE = "snapdragon-8-gen3"
STACK = ("ai_edge_litert", "ai_edge_quantizer", "onnx2tf", "tensorflow", "tf_keras")

_STATIC = (FP32, INT8, INT16X8)
_WEIGHTED = (FP32, FP16, INT8, INT16X8, INT8_DYNAMIC, INT8_WEIGHT)
# Per ONNX layer op, what ai-edge-quantizer 0.10 can lower for the TFLite op it becomes
# (its default_policy "ops_per_config"; tests/test_tflite_menu.py checks this against it).
MENU = PrecisionMenu(
    by_op={
        "Conv": _WEIGHTED, "ConvTranspose": _WEIGHTED,
        "Gemm": (*_WEIGHTED, INT4_WEIGHT), "MatMul": (*_WEIGHTED, INT4_WEIGHT),
        ACT_MATMUL: _STATIC,
        # An embedding lookup from a constant table becomes GATHER, which ai-edge-quantizer quantizes
        # only statically (its GATHER is in static_wi8_ai8/ai16, not in the weight-only configs, which
        # take EMBEDDING_LOOKUP): the table is one per-tensor tensor at the activation width (int8 with
        # a zero point, or symmetric int16) and the output shares its scale. No fp16 (float_casting
        # has no GATHER).
        "Gather": _STATIC,
        **{op: _STATIC for op in ("Add", "Mul", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool",
                                  "Resize", "Sigmoid")},
    },
    default=(FP32,),
    # Weight-only int8 saves bytes but runs float: valid in a hand-edited plan, not chosen by DMPQ.
    forced_only=(INT8_WEIGHT,),
)
REASONS = {
    "LeakyRelu": "ai-edge-quantizer has no static LEAKY_RELU kernel: kept fp32",
    **{op: f"{op} becomes a TFLite WHILE loop, which ai-edge-quantizer does not quantize: kept fp32" for op in RECURRENT},
    **{op: f"{op} subgraph kept fp32 (control flow is not quantized)" for op in CONTROL_FLOW},
}
# ai-edge-quantizer's int4 weights are per output channel, which the emulator's
# int4 blocks reproduce with one block spanning the whole reduction axis.
INT4_CHANNEL_BLOCK = 4096


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken install
        return False


def stack_missing() -> list[str]:
    return [m for m in STACK if not _importable(m)]


def snapdragon_profile(device: str) -> DeviceProfile:
    profile = get_device(device)
    if profile.target != "snapdragon":
        raise InputError(f"device {device!r} is for target {profile.target}, not snapdragon")
    return profile


class SnapdragonTarget:
    name = "snapdragon"
    description = "TFLite / LiteRT for Snapdragon phones (Hexagon NPU via the QNN delegate)"
    output_kind = "file"
    suffix = ".tflite"

    def available(self) -> tuple[bool, str]:
        missing = stack_missing()
        return (False, PIP_LINE) if missing else (True, "")

    def default_device(self) -> str:
        return DEFAULT_DEVICE

    def capabilities(self, graph: ModelGraph, device: str, threads: int | None = None) -> TargetCapabilities:
        from dscompile.targets.tflite_cost import SnapdragonCost, structure_bytes, weight_channels
        from dscompile.targets.tflite_ranges import SOFTMAX_SPAN

        profile = snapdragon_profile(device or DEFAULT_DEVICE)
        numerics = dict(DEFAULT_NUMERICS)
        numerics[INT4_WEIGHT] = Numerics("int4_block", "none", block_size=INT4_CHANNEL_BLOCK, weight_symmetric=True)
        for p in (INT8, INT16X8):  # GATHER tables: one per-tensor scale (see MENU)
            numerics[p] = replace(numerics[p], gather_table="tensor")
        return TargetCapabilities(
            self.name, profile.id, MENU,
            SnapdragonCost(profile, channels=weight_channels(graph.model), structure=structure_bytes(graph.model)),
            ActivationScheme(method="minmax", symmetric=False, softmax_span=SOFTMAX_SPAN),
            numerics, None, REASONS,
        )

    def lower(
        self, graph: ModelGraph, plan: QuantPlan | None, table: CalibrationTable | None,
        stage: Path, options: BuildOptions,
    ) -> Artifact:
        from dscompile.targets.tflite_lower import lower

        return lower(self, graph, plan, table, stage, options)

    def default_plan(self, graph: ModelGraph, table: CalibrationTable, device: str = DEFAULT_DEVICE) -> QuantPlan:
        """Int8 wherever the menu allows and the table has ranges: a plan without DMPQ."""
        from dscompile.targets.tflite_lower import default_plan, prepared

        g = prepared(graph)
        return default_plan(g, self.capabilities(g, device), table)

    def runner(self, artifact: Artifact, threads: int | None = None) -> LiteRTRunner:
        return LiteRTRunner(artifact.primary_path, None, threads)


TARGET = SnapdragonTarget()
