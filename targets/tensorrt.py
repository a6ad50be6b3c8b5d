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
from dscompile.compiler.layers import GraphIndex, find_layers
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
    gemm_outputs,
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


# What TensorRT computes for DQ -> Conv/Gemm/MatMul -> Q: int8 x int8 products accumulated in int32,
# rescaled in float, i.e. the Q/DQ graph's fake-quant arithmetic up to rounding. onnxruntime's default
# optimizations instead fuse the Q/DQ into its own integer kernels (QDQSelectorActionTransformer; on x86
# QDQS8ToU8Transformer first makes int8 activations uint8 with zero point 128), and on an x86 CPU without
# VNNI those multiply with vpmaddubsw, which adds each pair of uint8 x int8 products into a saturating int16
# (targets/ort_cpu_isa.py): a layer whose inputs and weights are both large clips, which TensorRT never does
# (a constructed conv: 57 % error on an AMD EPYC Zen 3, tests/test_tensorrt_numerics.py). So verification
# turns every QDQ transformer off ("session.disable_quant_qdq": also QDQPropagationTransformer,
# WeightBiasQuantization, EnsureUniqueDQForNodeUnit; onnxruntime's graph_transformer_utils.cc) and runs
# DQ -> float op -> Q as written; the float fusions and constant folding (of weight DQs too: exact) stay.
# It also avoids the opset-21 failure of the propagation (PR #28144 writes output_dtype=INT8 on the Q it
# inserts past MaxPool/Reshape, QDQS8ToU8Transformer then flips the zero point to UINT8: "output_dtype INT8
# does not match y_zero_point type UINT8"; #27845, #28491 / PR #28521, #25526).
ORT_SESSION_CONFIG = (("session.disable_quant_qdq", "1"),)


def verification_session(model: onnx.ModelProto, threads: int | None = None):
    """The onnxruntime session that stands in for TensorRT: Q/DQ as fake-quant arithmetic (see
    ``ORT_SESSION_CONFIG``), every FP16 tensor rounded where produced (compiler/fp16_emulate.py:
    onnxruntime's CPU would otherwise run FP16 layers in FP32 and hide their error)."""
    return ort_session(emulate_fp16(model), threads, config=ORT_SESSION_CONFIG)


class TensorRTRunner(OrtRunner):
    """onnxruntime on model.qdq.onnx: the same Q/DQ and FP16 arithmetic TensorRT executes
    (``verification_session``)."""

    def __init__(self, model: Path | str, threads: int | None = None) -> None:
        self.threads = threads
        self.session = verification_session(onnx.load(str(model)), threads)

    def where(self) -> str:
        return (f"{super().where()}, running {MODEL_FILE} in place of TensorRT: its Q/DQ as fake-quant arithmetic "
                "(onnxruntime's QDQ fusion off: its x86 integer kernels without VNNI saturate, TensorRT accumulates "
                "int8 in int32), every FP16 tensor rounded to FP16 where produced (computed in FP32; TensorRT's "
                "kernels differ by rounding and accumulation)")


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
        index = GraphIndex.of(graph.model)
        fused = gemm_outputs(find_layers(graph))

        def advise(layer: Layer, precision: str) -> str | None:
            return verdicts.advise(layer, precision) or (int8_output_unfit(layer, index, fused) if precision == INT8 else "") or None

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
