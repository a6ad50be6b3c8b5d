"""ONNX Runtime CPU target: an ONNX model that onnxruntime's CPU provider runs.

FP32 lowering writes the simplified export; quantised lowering (QDQ for the
integer kernels) follows the plan.
"""

from __future__ import annotations

from pathlib import Path

from dscompile.calibration.table import CalibrationTable
from dscompile.compiler.capabilities import (
    FP32,
    ActivationScheme,
    Cost,
    Layer,
    PrecisionMenu,
    TargetCapabilities,
)
from dscompile.compiler.graph import ModelGraph
from dscompile.compiler.onnx_io import save_model
from dscompile.compiler.plan import QuantPlan
from dscompile.profiles.runners import OrtRunner
from dscompile.targets.base import Artifact, BuildOptions, describe_files

MODEL_FILE = "model.onnx"


class _WeightBytesCost:
    """Size-only cost until the measured cost model lands: bytes of weights, no latency."""

    def cost(self, layer: Layer, precision: str) -> Cost:
        from dscompile.compiler.capabilities import WEIGHT_BITS

        return Cost(layer.params * WEIGHT_BITS[precision] // 8, 0.0, "estimated", "weight bytes only")


class OrtCpuTarget:
    name = "ort-cpu"
    description = "ONNX Runtime, CPU execution provider (x86-64 / Arm64)"
    output_kind = "file"
    suffix = ".onnx"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def default_device(self) -> str:
        return "this-cpu"

    def capabilities(self, graph: ModelGraph, device: str) -> TargetCapabilities:
        return TargetCapabilities(
            self.name, device, PrecisionMenu(by_op={}, default=(FP32,)), _WeightBytesCost(),
            ActivationScheme(method="minmax", symmetric=False),
        )

    def lower(
        self, graph: ModelGraph, plan: QuantPlan | None, table: CalibrationTable | None,
        stage: Path, options: BuildOptions,
    ) -> Artifact:
        files = save_model(graph.model, stage / MODEL_FILE)
        roles = {f: ("model" if f == MODEL_FILE else "other") for f in files}
        return Artifact(self.name, "this-cpu", stage, MODEL_FILE, describe_files(stage, roles))

    def runner(self, artifact: Artifact, threads: int | None = None) -> OrtRunner:
        return OrtRunner(artifact.primary_path, threads)


TARGET = OrtCpuTarget()
