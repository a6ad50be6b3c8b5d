"""In-process engine build with TensorRT's Python API, where ``tensorrt`` imports (a Jetson, or a host
with the board's TensorRT and GPU).

Written against the real API (NVIDIA/TensorRT python/src/infer/pyCore.cpp, parsers/pyOnnx.cpp;
Polygraphy's backend/trt/loader.py does the same steps): a strongly typed network
(NetworkDefinitionCreationFlag.STRONGLY_TYPED; TensorRT 8.x lacks it and gets the INT8/FP16 flags,
with which it honours the graph's Q/DQ), ONNX parser errors reported per node (IParserError
node_name/node_operator/desc), the timing cache loaded and saved beside the engine, the workspace
pool limit, DLA core with GPU fallback, and the optimization profile of dynamic inputs. Timing uses
trtexec --loadEngine when trtexec is installed (JetPack has it), parsed like a remote run.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from dscompile.errors import InputError
from dscompile.targets.tensorrt_log import measured_cells, parse_log
from dscompile.targets.tensorrt_script import (
    ENGINE_FILE,
    LOG_FILE,
    MODEL_FILE,
    TIMING_CACHE_FILE,
    TrtexecJob,
)

TRTEXEC_FALLBACK = "/usr/src/tensorrt/bin/trtexec"


def parser_error_lines(parser: Any) -> list[str]:
    """One line per ONNX parser error: the node's name and op and the parser's message."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        name = err.node_name() if hasattr(err, "node_name") else f"node #{err.node()}"
        op = err.node_operator() if hasattr(err, "node_operator") else "?"
        lines.append(f"node {name!r} ({op}): {err.desc()}")
    return lines


def _network(trt: Any, builder: Any) -> tuple[Any, bool]:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is not None:
        return builder.create_network(1 << int(flag)), True
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    return builder.create_network(1 << int(explicit) if explicit is not None else 0), False


def _configure(trt: Any, builder: Any, config: Any, job: TrtexecJob, strongly_typed: bool, cache_path: Path) -> Any:
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, job.workspace_mib << 20)
    if not strongly_typed:  # TensorRT 8.x: Q/DQ are honoured when INT8 (and FP16) are allowed
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
    if job.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = job.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if job.shapes:
        profile = builder.create_optimization_profile()
        for name in job.shapes["opt"]:
            profile.set_shape(name, job.shapes["min"][name], job.shapes["opt"][name], job.shapes["max"][name])
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def build_engine(onnx_path: Path, engine_path: Path, cache_path: Path, job: TrtexecJob) -> dict[str, Any]:
    """Parse, build and serialize; raise InputError with the parser's per-node message on failure."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, strongly_typed = _network(trt, builder)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = parser_error_lines(parser) or ["the ONNX parser gave no detail"]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise InputError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {errors[0]}{more}")
    config = builder.create_builder_config()
    _configure(trt, builder, config, job, strongly_typed, cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise InputError(f"TensorRT {trt.__version__} could not build an engine from {onnx_path.name} (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"tensorrt": trt.__version__, "strongly_typed": strongly_typed}


def _time_with_trtexec(stage: Path, job: TrtexecJob) -> dict[str, Any]:
    trtexec = shutil.which("trtexec") or (TRTEXEC_FALLBACK if Path(TRTEXEC_FALLBACK).exists() else None)
    if trtexec is None:
        return {"kind": None, "why": "engine built, not timed: no trtexec on this machine"}
    args = [trtexec, f"--loadEngine={ENGINE_FILE}"]
    if job.shapes:
        args.append("--shapes=" + ",".join(f"{n}:{'x'.join(map(str, d))}" for n, d in job.shapes["opt"].items()))
    if job.dla_core is not None:
        args.append(f"--useDLACore={job.dla_core}")
    proc = subprocess.run(args, cwd=stage, capture_output=True, text=True, timeout=600)
    (stage / LOG_FILE).write_text(proc.stdout + proc.stderr)
    run = parse_log(proc.stdout + proc.stderr)
    if proc.returncode != 0 or run.failed:
        return {"kind": None, "why": f"engine built; trtexec could not time it: {run.first_error()}"}
    return measured_cells(run, f"trtexec --loadEngine on this machine, TensorRT {run.tensorrt}")


def build_local(stage: Path, job: TrtexecJob) -> dict[str, Any]:
    """Build ``stage/model.qdq.onnx`` here and time it where trtexec exists."""
    info = build_engine(stage / MODEL_FILE, stage / ENGINE_FILE, stage / TIMING_CACHE_FILE, job)
    return {"built": True, "where": "here (TensorRT Python API)", **info, "engine": ENGINE_FILE,
            "timing": _time_with_trtexec(stage, job)}
