"""The public Python API: one function per command, each taking and returning values.

    from dscompile import api
    result = api.compile("model.pt", target="ort-cpu", input_shapes=["x:1x3x224x224"], output="m.onnx")
    info = api.inspect("model.onnx")
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dscompile.calibration.collect import calibrate as collect_calibration
from dscompile.calibration.collect import settings as calibration_settings
from dscompile.calibration.datasets import DataOptions, open_data
from dscompile.calibration.table import METHODS, CalibrationTable, reusable_table, trt_cache_text
from dscompile.compiler.graph import graph_inputs, graph_outputs, macs, parameter_stats
from dscompile.compiler.ingest import IngestOptions, detect_format, ingest, load_onnx
from dscompile.compiler.shapes import parse_input_shape
from dscompile.errors import OutputError
from dscompile.fileio import check_writable, write_text
from dscompile.pipeline import CompileOptions, CompileResult, check_in_memory, compile_model

__all__ = ["CalibrateResult", "PlanResult", "build", "plan", "CompileOptions", "CompileResult", "DataOptions", "IngestOptions", "calibrate",
           "compile", "inspect", "profile"]

log = logging.getLogger("dscompile")


@dataclass(frozen=True)
class CalibrateResult:
    table: CalibrationTable
    output: Path
    trt_cache: Path | None
    reused: bool  # the table at ``output`` was already made for this model, data and settings
    data: str  # what the data was


def compile(
    model: str | Path,
    target: str = "ort-cpu",
    output: str | Path | None = None,
    input_shapes: list[str] | None = None,
    options: CompileOptions | None = None,
    **overrides: Any,
) -> CompileResult:
    """Compile ``model`` for ``target``; ``overrides`` set CompileOptions fields."""
    opts = options or CompileOptions()
    if input_shapes:
        ing = replace(opts.ingest, input_shapes=tuple(parse_input_shape(s, i) for i, s in enumerate(input_shapes)))
        opts = replace(opts, ingest=ing)
    opts = replace(opts, target=target, output=Path(output) if output else opts.output, **overrides)
    return compile_model(model, opts)


def inspect(model: str | Path, options: IngestOptions | None = None) -> dict[str, Any]:
    """Ops by type, parameters, bytes, MACs, inputs and outputs of a model.

    ONNX files are read as they are; torch sources are exported first (and need
    their input shapes in ``options``).
    """
    path = Path(model)
    fmt = detect_format(path)
    if fmt == "onnx":
        onnx_model = load_onnx(path)
        ins, outs = graph_inputs(onnx_model), graph_outputs(onnx_model)
    else:
        graph = ingest(path, replace(options or IngestOptions(), check=False)).graph
        onnx_model, ins, outs = graph.model, graph.inputs, graph.outputs
    from collections import Counter

    params, nbytes = parameter_stats(onnx_model)
    opsets = {op.domain or "ai.onnx": op.version for op in onnx_model.opset_import}
    return {
        "path": str(path),
        "format": fmt,
        "opsets": opsets,
        "inputs": [s.to_json() for s in ins],
        "outputs": [s.to_json() for s in outs],
        "ops": dict(sorted(Counter(n.op_type for n in onnx_model.graph.node).items(), key=lambda kv: -kv[1])),
        "nodes": len(onnx_model.graph.node),
        "parameters": params,
        "parameter_bytes": nbytes,
        "macs": macs(onnx_model),
    }


def calibrate(
    model: str | Path,
    data: str | Path,
    output: str | Path | None = None,
    *,
    trt_cache: str | Path | None = None,
    methods: Sequence[str] = METHODS,
    percentile: float = 99.99,
    data_options: DataOptions | None = None,
    ingest_options: IngestOptions | None = None,
    force: bool = False,
    progress: bool = True,
) -> CalibrateResult:
    """Calibrate ``model`` on ``data`` and write the table (and a TensorRT cache).

    A table already at ``output`` for the same model, data and settings is reused
    (``force`` recomputes); one for another model is refused unless ``force``.
    """
    model = Path(model)
    out = Path(output) if output else model.parent / f"{model.name.split('.')[0] or 'model'}.calib.json"
    for path in (out, trt_cache):
        if path is not None and not Path(path).exists():
            check_writable(path, force)  # a missing folder fails now, not after the work
    graph = ingest(model, ingest_options or IngestOptions()).graph
    check_in_memory(graph, "calibration")
    source = open_data(data, graph.inputs, data_options or DataOptions())
    settings = calibration_settings(methods, percentile, 2048)
    table = reusable_table(out, graph.sha256, source.sha256, settings, force)
    reused = table is not None
    if table is None:
        if trt_cache and Path(trt_cache).exists() and not force:
            raise OutputError(f"{trt_cache}: already exists (use --force to overwrite)")
        table = collect_calibration(graph.model, source, model_sha256=graph.sha256, data_sha256=source.sha256,
                                    methods=methods, percentile=percentile, progress=progress)
        table.save(out, force=force)
    else:
        log.info(f"{out}: reusing the table made for this model and data ({table.samples} samples); --force recomputes")
    cache = _write_trt_cache(table, trt_cache, methods[0], force) if trt_cache else None
    return CalibrateResult(table, out, cache, reused, source.describe())


def _write_trt_cache(table: CalibrationTable, path: str | Path, method: str, force: bool) -> Path:
    path = Path(path)
    text = trt_cache_text(table, method)
    if path.exists() and not force:
        if path.read_text() == text:
            return path
        raise OutputError(f"{path}: already exists (use --force to overwrite)")
    return write_text(path, text, force)


@dataclass(frozen=True)
class PlanResult:
    plan: Any  # QuantPlan
    output: Path
    plots: list[Path]


def plan(
    model: str | Path, calib: str | Path, output: str | Path, target: str = "ort-cpu", device: str | None = None,
    settings: Any = None, data_options: DataOptions | None = None, ingest_options: IngestOptions | None = None,
    verify_samples: int = 16, threads: int | None = None, seed: int = 0, plots: str | Path | None = None,
    force: bool = False,
) -> PlanResult:
    """Calibrate on ``calib`` data, plan mixed precision (DMPQ + repair on held-out samples), save plan.json."""
    from dscompile.pipeline import calibrate_stage
    from dscompile.planning import (
        PlanSettings,
        check_numeric_outputs,
        check_plots_writable,
        plan_for,
        write_plan_plots,
    )
    from dscompile.targets.base import get_target

    out = check_writable(output, force)
    check_plots_writable(plots, force)
    settings = replace(settings or PlanSettings(), threads=threads, seed=seed)
    opts = CompileOptions(target=target, device=device, force=force, ingest=ingest_options or IngestOptions(),
                          verify_samples=verify_samples, threads=threads, seed=seed, calib=Path(calib),
                          data=data_options or DataOptions(), planning=settings)
    tgt = get_target(target)
    ingested = ingest(model, opts.ingest)
    check_in_memory(ingested.graph, "planning")
    check_numeric_outputs(ingested.graph)
    calibrated = calibrate_stage(ingested, opts)
    if not calibrated.samples:
        from dscompile.errors import InputError

        raise InputError(f"{calib}: planning needs sample data (a folder, .npy/.npz or generator), not a calib.json")
    result, _ = plan_for(tgt, ingested.graph, device or tgt.default_device(), calibrated.table, calibrated.samples,
                         calibrated.holdout, settings)
    pngs = write_plan_plots(result, plots, force) if plots else []
    result.save(out, force)
    return PlanResult(result, out, pngs)


def build(model: str | Path, plan_file: str | Path, target: str = "ort-cpu", output: str | Path | None = None,
          calib: str | Path | None = None, options: CompileOptions | None = None, **overrides: Any) -> CompileResult:
    """Build ``plan_file`` for ``model`` exactly as written (checked), verify it, write artifact + report."""
    opts = replace(options or CompileOptions(), plan=Path(plan_file), calib=Path(calib) if calib else None)
    return compile(model, target=target, output=output, options=opts, **overrides)


def profile(
    paths: list[str | Path],
    devices: list[str] | None = None,
    precisions: list[str] | None = None,
    batches: list[int] | None = None,
    output: str | Path | None = None,
    force: bool = False,
    options: Any = None,
) -> Any:
    """The FPS matrix of models/artifacts on devices; written to ``output`` (a folder) when given.

    ``options`` is a ``dscompile.profiler.ProfileOptions``; the other arguments override its fields.
    """
    from dscompile import profiler
    from dscompile.profiles.devices import THIS_CPU, get_device
    from dscompile.profiles.matrix import save_matrix

    opts = options or profiler.ProfileOptions()
    overrides: dict[str, Any] = {}
    if devices:
        overrides["devices"] = tuple(devices)
    if precisions:
        overrides["precisions"] = tuple(precisions)
    if batches:
        overrides["batches"] = tuple(batches)
    opts = replace(opts, **overrides)
    for d in opts.devices:
        if d != THIS_CPU:
            get_device(d)  # unknown names fail here, listing the known ones, before any work
    if output is not None:
        from dscompile.fileio import check_writable

        check_writable(output, force)
    matrix = profiler.profile_paths([Path(p) for p in paths], opts)
    if output is not None:
        save_matrix(matrix, output, force)
    return matrix
