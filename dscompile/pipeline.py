"""Runs the stages in order: ingest -> (calibrate -> plan) -> lower -> verify -> write.

Every output is staged in a temporary folder beside its destination, verified
there, and moved into place only when everything succeeded.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dscompile.calibration.collect import calibrate
from dscompile.calibration.datasets import DataOptions, open_data, split_holdout
from dscompile.calibration.feeds import batches
from dscompile.calibration.table import CalibrationTable
from dscompile.compiler.distill import DistillOptions
from dscompile.compiler.ingest import Ingested, IngestOptions, ingest
from dscompile.compiler.onnx_io import weights_dir
from dscompile.compiler.plan import QuantPlan
from dscompile.compiler.report import build_report
from dscompile.compiler.samples import synthetic_feeds
from dscompile.compiler.verify import Fidelity, compare
from dscompile.distilling import (
    BIAS_ONLY_SAMPLES,
    check_distill_inputs,
    make_distiller,
    mixed_shapes,
    sample_count,
)
from dscompile.errors import InputError, MissingBackendError, OutputError, VerificationError
from dscompile.fileio import check_writable, make_stage, replace_dir, write_json
from dscompile.planning import (
    PlanSettings,
    calibration_tensors,
    check_numeric_outputs,
    check_plots_writable,
    load_plan,
    plan_for,
    write_plan_plots,
)
from dscompile.profiles.devices import THIS_CPU, get_device
from dscompile.profiles.runners import OrtRunner, time_runner
from dscompile.targets.base import Artifact, BuildOptions, get_target

log = logging.getLogger("dscompile")


@dataclass(frozen=True)
class CompileOptions:
    target: str = "ort-cpu"
    device: str | None = None
    output: Path | None = None
    force: bool = False
    ingest: IngestOptions = field(default_factory=IngestOptions)
    verify_samples: int = 16
    min_cosine: float | None = None  # None: 0.999 for an all-FP32 build, no floor otherwise
    measure_latency: bool = True
    threads: int | None = None
    seed: int = 0
    calib: Path | None = None  # sample data to calibrate on, or an existing calib.json
    data: DataOptions = field(default_factory=DataOptions)
    target_options: BuildOptions = field(default_factory=BuildOptions)  # --remote, --shapes, --dla, --build
    plan: Path | None = None  # a plan.json to build as it is (no planning)
    planning: PlanSettings = field(default_factory=PlanSettings)
    quantize: bool = True  # with --calib: plan and build mixed precision (False: calibrate, build fp32)
    plots: Path | None = None  # folder for sensitivity/allocation PNGs
    distill: DistillOptions | None = None  # None: bias correction only (unless bias_correction is False)
    bias_correction: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Calibrated:
    """What calibrate_stage hands on: the table and held-out feeds for verification."""

    table: CalibrationTable | None = None
    holdout: tuple[dict, ...] = ()
    source: str = ""  # the calib.json used, or a description of the data
    samples: tuple[dict, ...] = ()  # calibration feeds (never the held-out ones): sensitivity's subset first, GPTQ's all
    distill_samples: tuple[dict, ...] = ()  # calibration feeds distillation learns from (and checks on)


@dataclass(frozen=True)
class CompileResult:
    artifact: Artifact
    report: dict[str, Any]
    output: Path
    report_path: Path


def default_output(model: Path, target_name: str, suffix: str, kind: str) -> Path:
    stem = model.name.split(".")[0] or "model"
    name = f"{stem}.{target_name}" + (suffix if kind == "file" else "")
    return model.parent / name


def report_path_for(output: Path, kind: str) -> Path:
    return output / "report.json" if kind == "dir" else output.with_suffix(".report.json")


def check_device(target: str, device: str | None) -> None:
    """An unknown --device, or one profiled for another target, fails before any work (not only when planning)."""
    if device and device != THIS_CPU:
        profile = get_device(device)
        if profile.target != target:
            raise InputError(f"device {device!r} is for target {profile.target}, not {target}")


def check_in_memory(graph, what: str) -> None:
    """Calibration and quantisation work on the model in memory: one past 2 GB (weights on disk) is refused."""
    if weights_dir(graph.model) is not None:
        raise InputError(f"{graph.source.path}: {what} needs the weights in memory, and this model's are past protobuf's "
                         "2 GB limit (kept on disk); compile it at fp32 (without --calib / --plan)")


def compile_model(model: str | Path, options: CompileOptions) -> CompileResult:
    target = get_target(options.target)
    ok, why = target.available()
    if not ok:
        raise MissingBackendError(f"target {target.name}'s runtime", why)
    check_device(target.name, options.device)
    model = Path(model)
    out = Path(options.output) if options.output else default_output(model, target.name, target.suffix, target.output_kind)
    rpath = report_path_for(out, target.output_kind)
    check_writable(out, options.force)
    if target.output_kind == "file":
        check_writable(rpath, options.force)

    check_plots_writable(options.plots, options.force)
    ingested = ingest(model, options.ingest)
    graph = ingested.graph
    if options.calib is not None or options.plan is not None:
        check_in_memory(graph, "calibration" if options.plan is None else "building a plan")
    device = options.device or target.default_device()
    if options.calib is not None and options.quantize and options.plan is None:
        check_numeric_outputs(graph)  # before any calibration work
    if options.distill is not None:
        check_distill_inputs(ingested, options.distill, options.calib)
    calibrated = calibrate_stage(ingested, options)
    table = calibrated.table
    distiller = _distiller(target, ingested, calibrated, options, device)
    plan = plan_stage(target, graph, device, calibrated, options, distiller.repair_hook() if distiller else None)
    if options.plots and plan is not None:
        write_plan_plots(plan, options.plots, options.force)
    distilled: dict[str, Any] = {}
    if distiller is not None and plan is not None:
        graph, plan, distilled = distiller.final(plan)
    stage = make_stage(out)
    try:
        build = replace(options.target_options, seed=options.seed, threads=options.threads, device=device, extra=options.extra,
                        samples=calibrated.samples, refit_weights=not distilled)
        artifact = target.lower(graph, plan, table, stage, build)
        fidelity, latency = _verify(ingested, target, artifact, options, calibrated.holdout, plan)
        report = build_report(
            target=target.name, device=device, graph=graph,
            artifacts=[f.to_json() for f in artifact.files],
            artifact_bytes=sum(f.bytes for f in artifact.files),
            plan=plan, fidelity=fidelity, latency=latency, export_check=ingested.export_check,
            extra={**artifact.notes, **_calibration_report(calibrated), **_plan_report(plan),
                   **({"distillation": distilled} if distilled else {})} or None,
        )
        final = _commit(stage, artifact, out, rpath, report, target.output_kind, options.force)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return CompileResult(final, report, out, rpath)


def calibrate_stage(ingested: Ingested, options: CompileOptions) -> Calibrated:
    """Load ``options.calib`` (a calib.json for this model) or calibrate on it (sample data).

    From sample data, ``verify_samples`` samples are held out: verification runs
    on them, never on the samples the thresholds came from.
    """
    if options.calib is None:
        return Calibrated()
    graph = ingested.graph
    path = Path(options.calib)
    if path.is_file() and path.suffix.lower() == ".json":
        table = CalibrationTable.load(path)
        table.check_model(graph.sha256, options.force)
        log.info(f"calibration: using {path} ({len(table.tensors)} tensors, {table.samples} samples)")
        return Calibrated(table, (), str(path))
    source = open_data(path, graph.inputs, replace(options.data, seed=options.seed))
    calib_src, held = split_holdout(source, options.verify_samples)
    tensors = calibration_tensors(graph) if options.quantize and options.plan is None else None
    table = calibrate(graph.model, calib_src, model_sha256=graph.sha256, data_sha256=calib_src.sha256, tensors=tensors)
    # Said after the data has been read: a bad sample stays the run's only stderr line.
    log.info(f"calibration: {calib_src.samples} samples from {path}, {held.samples} held out for verification")
    # every calibration sample up to FIT_BYTES (at least the sensitivity subset): sensitivity measures on the
    # first --sensitivity-samples, GPTQ fits int4 weights to all of them (more tokens, a better Hessian)
    samples = _fit_samples(batches(calib_src.feeds(), calib_src.specs, 1), options.planning.sensitivity_samples)
    want = _distill_options(options)
    distill_samples = () if want is None else tuple(
        itertools.islice(batches(calib_src.feeds(), calib_src.specs, 1), sample_count(want)))
    return Calibrated(table, tuple(batches(held.feeds(), held.specs, 1)), source.describe(), samples, distill_samples)


FIT_SAMPLES, FIT_BYTES = 256, 64 << 20  # what GPTQ fits to, at most (one onnxruntime run per sample)


def _fit_samples(feeds, at_least: int) -> tuple[dict, ...]:
    out, size = [], 0
    for feed in feeds:
        size += sum(v.nbytes for v in feed.values())
        if len(out) >= at_least and (size > FIT_BYTES or len(out) >= FIT_SAMPLES):
            break
        out.append(feed)
    return tuple(out)


def _distill_options(options: CompileOptions) -> DistillOptions | None:
    """--distill as given; else bias correction alone (on by default for quantised builds)."""
    if not options.quantize:
        return None
    if options.distill is not None:
        return options.distill
    return DistillOptions(mode="bias", max_samples=BIAS_ONLY_SAMPLES) if options.bias_correction else None


def _distiller(target, ingested: Ingested, calibrated: Calibrated, options: CompileOptions, device: str):
    want = _distill_options(options)
    if want is None:
        return None
    if not calibrated.distill_samples:
        if options.distill is not None:
            raise InputError("--distill learns from sample data: pass --calib DATA (a folder or .npz of inputs), "
                             "not only a calib.json")
        return None
    mixed = mixed_shapes(calibrated.distill_samples)
    if mixed and options.distill is not None:
        raise InputError(f"--distill needs calibration samples of one shape: {mixed}")
    if mixed:  # bias correction is on by default, not asked for: leave it out and say why
        log.warning(f"bias correction skipped: the calibration samples differ in shape ({mixed})")
        return None
    return make_distiller(target, ingested, calibrated.table, calibrated.distill_samples, want, device,
                          options.threads, options.seed)


def plan_stage(target, graph, device: str, calibrated: Calibrated, options: CompileOptions,
               prepare=None) -> QuantPlan | None:
    """The plan file as given (checked), or a DMPQ plan repaired on the held-out samples, or None (fp32)."""
    if options.plan is not None:
        return load_plan(options.plan, target, graph, device, calibrated.table, options.force)
    if calibrated.table is None or not options.quantize:
        return None
    if not calibrated.samples:
        raise InputError("mixed precision needs sample data to measure sensitivity: pass --calib DATA, not only a calib.json "
                         "(or build a saved plan with --plan)")
    settings = replace(options.planning, threads=options.threads, seed=options.seed)
    plan, _ = plan_for(target, graph, device, calibrated.table, calibrated.samples, calibrated.holdout, settings, prepare)
    return plan


def _plan_report(plan: QuantPlan | None) -> dict[str, Any]:
    return {"plan_json": plan.to_json()} if plan is not None else {}


def _calibration_report(c: Calibrated) -> dict[str, Any]:
    if c.table is None:
        return {}
    return {"calibration": {
        "source": c.source, "samples": c.table.samples, "tensors": len(c.table.tensors),
        "data_sha256": c.table.data_sha256,
        "verified_on": f"{len(c.holdout)} held-out samples" if c.holdout else "synthetic inputs",
    }}


def _verify(ingested: Ingested, target, artifact: Artifact, options: CompileOptions,
            holdout: tuple[dict, ...] = (), plan: QuantPlan | None = None) -> tuple[Fidelity | None, dict | None]:
    graph = ingested.graph
    runner = target.runner(artifact, options.threads)
    if runner is None:
        return None, None
    # held-out calibration samples when there are some: real data, unseen by calibration
    feeds = list(holdout) or synthetic_feeds(graph.inputs, options.verify_samples, options.seed + 1, graph.model)
    # One runtime session at a time: for a model past 2 GB, two would hold two copies of its weights.
    where, got = runner.where(), [runner.run(f) for f in feeds]
    t_art = time_runner(runner, feeds[0]) if options.measure_latency else None
    del runner
    reference = OrtRunner(graph.model, options.threads)
    replay = iter(got)
    goal = options.planning.min_fidelity
    fidelity = compare(reference.run, lambda _: next(replay), feeds, where, goal.user if goal and plan else None)
    floor = options.min_cosine if options.min_cosine is not None else (0.999 if plan is None else None)
    if floor is not None and fidelity.cosine < floor:
        raise VerificationError(
            f"the {target.name} artifact disagrees with its FP32 source: cosine {fidelity.cosine:.5f} < {floor}"
        )
    if plan is not None and goal is not None and not goal.met(fidelity):
        raise VerificationError(
            f"the {target.name} artifact misses --min-fidelity {goal.metric}={goal.value}: {goal.measure(fidelity):.5f} "
            f"on {fidelity.samples} {'held-out' if holdout else 'synthetic'} samples"
        )
    if t_art is None:
        return fidelity, None
    t_ref = time_runner(reference, feeds[0])
    latency = {"fp32_ms_p50": round(t_ref.p50_ms, 4), **t_art.to_json()}
    return fidelity, latency


def _commit(stage: Path, artifact: Artifact, out: Path, rpath: Path, report: dict, kind: str, force: bool) -> Artifact:
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists (use --force to overwrite)")
    if kind == "file" and not force:  # an external-data file beside the artifact must not replace another's
        taken = [f.path for f in artifact.files if f.path != artifact.primary and (out.parent / f.path).exists()]
        if taken:
            raise OutputError(f"{out.parent / taken[0]}: already exists (use --force to overwrite)")
    try:
        if kind == "dir":
            write_json(stage / "report.json", report, force=True)
            replace_dir(stage, out)
            stage.mkdir()  # the caller's cleanup removes this empty placeholder
            return artifact.relocated(out)
        # The artifact lands first: a run killed between the renames leaves a complete,
        # verified artifact without its report, never a report without its artifact.
        for f in artifact.files:
            if f.path != artifact.primary:
                os.replace(stage / f.path, out.parent / f.path)
        os.replace(stage / artifact.primary, out)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write ({exc.strerror})") from None
    write_json(rpath, report, force)
    return artifact.relocated(out.parent, out.name)
