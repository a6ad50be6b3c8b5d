"""Jetson Orin target: strongly typed, explicitly quantized ONNX for TensorRT, verified here.

The folder it writes holds ``model.qdq.onnx`` (precision in the graph: Q/DQ and Casts placed for
TensorRT), ``calibration.cache`` (TensorRT's format), ``plan.json``, ``build_engine.sh`` (the
trtexec line) and, when an engine was built, ``model.engine`` with its log and timing cache.
Engines are built by TensorRT on the board (over SSH with --remote) or in process where the
``tensorrt`` package imports; numerics are verified here by onnxruntime running the Q/DQ model.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx

from dscompile.calibration.table import CalibrationTable, write_trt_cache
from dscompile.compiler.capabilities import INT8, Cost, Layer, TargetCapabilities
from dscompile.compiler.fp16_emulate import emulate_fp16
from dscompile.compiler.graph import ModelGraph, static_shapes
from dscompile.compiler.normalize import prepared
from dscompile.compiler.onnx_io import save_model
from dscompile.compiler.plan import QuantPlan
from dscompile.compiler.runtime import ort_session
from dscompile.errors import InputError, MissingBackendError
from dscompile.fileio import write_text
from dscompile.profiles.devices import get_device
from dscompile.profiles.runners import OrtRunner
from dscompile.targets.base import Artifact, BuildOptions, describe_files
from dscompile.targets.tensorrt_dla import dla_placement
from dscompile.targets.tensorrt_plan import (
    MENU,
    NUMERICS,
    default_plan,
    int8_output_unfit,
    reference_precision,
)
from dscompile.targets.tensorrt_qdq import ACTIVATIONS, lower_plan
from dscompile.targets.tensorrt_rules import RuleReport, check_model
from dscompile.targets.tensorrt_script import (
    ENGINE_FILE,
    LOG_FILE,
    MODEL_FILE,
    SCRIPT_FILE,
    TIMING_CACHE_FILE,
    TrtexecJob,
    build_script,
    how_to_run,
)
from dscompile.targets.tensorrt_shapes import check_profile
from dscompile.targets.tensorrt_verdicts import layer_verdicts
from dscompile.targets.tensorrt_versions import TensorRTRelease, dla_cores, release_for_device

DEFAULT_DEVICE = "jetson-agx-orin-64gb"
CACHE_FILE = "calibration.cache"
PLAN_FILE = "plan.json"
TENSORRT_INSTALL = "pip install 'dscompile[tensorrt]' (on a Jetson: JetPack's python3-libnvinfer)"
_ROLES = {MODEL_FILE: "model", CACHE_FILE: "calibration-cache", PLAN_FILE: "plan", SCRIPT_FILE: "script",
          ENGINE_FILE: "engine", LOG_FILE: "other", TIMING_CACHE_FILE: "other"}


class RooflineCost:
    """Per-layer cost on the device, from its profile (profiles/estimate.py's roofline)."""

    def __init__(self, device: str) -> None:
        self.profile = get_device(device)

    def cost(self, layer: Layer, precision: str) -> Cost:
        from dscompile.profiles.estimate import layer_cost

        return layer_cost(self.profile, layer, precision)


# onnxruntime >= 1.2x's QDQPropagationTransformer copies Q/DQ past MaxPool/Reshape/Transpose/... and, at
# opset >= 21, writes output_dtype=INT8 on the Q it inserts (microsoft/onnxruntime PR #28144, the fix
# of #27845); the x86 QDQS8ToU8Transformer then turns the shared zero point into UINT8 without
# touching output_dtype, and session creation fails ("output_dtype INT8 does not match y_zero_point
# type UINT8"; same family: #28491 / PR #28521, #25526). The propagation only re-quantizes a value
# already on the grid (max, reshape and transpose keep int8 codes exact), so skipping it changes no
# number; every other default optimization (QDQ fusion into integer kernels, as TensorRT fuses) runs.
ORT_SKIPPED_OPTIMIZERS = ("QDQPropagationTransformer",)


class TensorRTRunner(OrtRunner):
    """onnxruntime on model.qdq.onnx: the same Q/DQ and FP16 arithmetic TensorRT executes.

    Default graph optimizations except ``ORT_SKIPPED_OPTIMIZERS`` (see the comment there); FP16
    tensors rounded where produced (compiler/fp16_emulate.py: onnxruntime's CPU would otherwise run
    FP16 layers in FP32 and hide their error).
    """

    def __init__(self, model: Path | str, threads: int | None = None) -> None:
        self.threads = threads
        self.session = ort_session(emulate_fp16(onnx.load(str(model))), threads, disabled_optimizers=ORT_SKIPPED_OPTIMIZERS)

    def where(self) -> str:
        return (f"{super().where()}, default graph optimizations but QDQPropagationTransformer, running "
                f"{MODEL_FILE} in place of TensorRT: its Q/DQ, and every FP16 tensor rounded to FP16 where produced "
                "(computed in FP32; TensorRT's kernels differ by rounding and accumulation)")


def tensorrt_importable() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


class TensorRTTarget:
    name = "jetson-orin"
    description = "NVIDIA Jetson Orin: strongly typed Q/DQ ONNX for TensorRT, engine built on the board"
    output_kind = "dir"
    suffix = ""

    def available(self) -> tuple[bool, str]:
        return True, ""  # the Q/DQ model and its verification need only onnxruntime

    def default_device(self) -> str:
        return DEFAULT_DEVICE

    def capabilities(self, graph: ModelGraph, device: str) -> TargetCapabilities:
        # The rule checker's verdicts per layer: DMPQ never picks a precision TensorRT refuses or runs no faster.
        verdicts = layer_verdicts(graph, release_for_device(device), self.name)
        outputs = frozenset(o.name for o in graph.model.graph.output)

        def advise(layer: Layer, precision: str) -> str | None:
            return verdicts.advise(layer, precision) or (int8_output_unfit(layer, outputs) if precision == INT8 else "") or None

        caps = TargetCapabilities(self.name, device, MENU, RooflineCost(device), ACTIVATIONS,
                                  NUMERICS, check=verdicts.check, advice=advise)
        # DMPQ's default budget is capped at the conventional INT8/FP16 placement's sensitivity (dmpq.py)
        return replace(caps, reference=lambda layer: reference_precision(layer, caps.layer_menu(layer)))

    def lower(
        self, graph: ModelGraph, plan: QuantPlan | None, table: CalibrationTable | None,
        stage: Path, options: BuildOptions,
    ) -> Artifact:
        graph = prepared(graph)  # the graph DMPQ planned on (weights held by Constant nodes are layers there)
        device = options.device or DEFAULT_DEVICE
        release = release_for_device(device)
        profile = check_profile(graph.inputs, options.shapes, table)
        if options.build_engine and not options.remote and not tensorrt_importable():
            raise MissingBackendError("the tensorrt Python package (needed for --build)", TENSORRT_INSTALL)
        plan = plan or default_plan(graph, table, self.name, device)
        model, placement = lower_plan(graph, plan, table)
        rules = self._check(model, release, device, options, profile)
        job = TrtexecJob(strongly_typed=release.strongly_typed, dla_core=options.dla, shapes=profile)
        save_model(model, stage / MODEL_FILE)
        plan.save(stage / PLAN_FILE)
        if table is not None:
            write_trt_cache(table, stage / CACHE_FILE)
        write_text(stage / SCRIPT_FILE, build_script(job, release.label))
        (stage / SCRIPT_FILE).chmod(0o755)
        engine = self._engine(stage, job, release, options)
        notes = {"precision": plan.precision_counts(), "tensorrt": {
            "release": release.to_json(), "trtexec": job.command(), "rules": rules.to_json(),
            "placement": placement.to_json(model), "engine": engine,
            "numerics": "verified by onnxruntime running model.qdq.onnx (standard ONNX Q/DQ and Cast): the "
                        "arithmetic TensorRT executes, up to its kernels' rounding; not a TensorRT run",
        }}
        files = {f: r for f, r in _ROLES.items() if (stage / f).exists()}
        return Artifact(self.name, device, stage, MODEL_FILE, describe_files(stage, files), notes)

    def _check(self, model: onnx.ModelProto, release: TensorRTRelease, device: str, options: BuildOptions,
               profile) -> RuleReport:
        shapes = static_shapes(model)
        rules = check_model(model, release, shapes)
        errors = rules.by_severity("error")
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise InputError(errors[0].line(release) + more)
        if options.dla is not None:
            dla = dla_placement(model, options.dla, dla_cores(device), device, profile, shapes)
            rules = RuleReport(rules.release, rules.findings, rules.nodes_checked, dla)
        return rules

    def _engine(self, stage: Path, job: TrtexecJob, release: TensorRTRelease, options: BuildOptions) -> dict[str, Any]:
        if options.remote:
            from dscompile.targets.tensorrt_remote import build_remote

            return build_remote(stage, job, options.remote)
        if options.build_engine is False or not tensorrt_importable():
            why = "--no-build" if options.build_engine is False else "the tensorrt package does not import here"
            return {"built": False, "why": why, "how": how_to_run("the output folder")}
        from dscompile.targets.tensorrt_engine import build_local

        return build_local(stage, job)

    def runner(self, artifact: Artifact, threads: int | None = None) -> TensorRTRunner:
        return TensorRTRunner(artifact.primary_path, threads)


TARGET = TensorRTTarget()
