"""Build the FPS matrix: measured cells where a runtime is reachable, estimated cells from device profiles.

Measured cells come from *sources*, one per runtime (``SOURCES``: name ->
"module:attribute", imported lazily so a missing runtime never breaks the
others). A source is a callable ``(subject, device, settings) -> list[Cell]``
that measures on this machine, or returns one missing cell saying why.
Remote boards (SSH trtexec on a Jetson, ADB benchmark_model on a phone) plug in
through ``REMOTE_SOURCES``, keyed by target: the target modules provide
``remote_cells(path, remote, profile, batch, *, model, precision, shapes,
benchmark_binary) -> list[Cell]`` (keywords a runner does not use go to ``**_``).
``--remote`` measures one board: the first listed device whose target is reached
that way (user@host[:port]: a Jetson; adb:SERIAL: a phone). A board that cannot be
reached is a one-line error before anything is measured here.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from dscompile.compiler.capabilities import FP32
from dscompile.compiler.ingest import IngestOptions, detect_format, ingest, load_onnx
from dscompile.errors import InputError
from dscompile.profiles.devices import THIS_CPU, DeviceProfile, get_device
from dscompile.profiles.estimate import efficiency_for, model_estimate, source_of
from dscompile.profiles.layers import extract_layers, fold_qdq
from dscompile.profiles.matrix import Cell, FpsMatrix, estimated_cell, measured_cell, missing_cell
from dscompile.profiles.measure import Settings, file_kind, in_child, measure_onnx, measure_tflite

log = logging.getLogger("dscompile")

# Runtime on this machine per artifact kind. One line each; a new runtime is one more line.
SOURCES: dict[str, str] = {
    "onnx": "dscompile.profiler:ort_cells",
    "tflite": "dscompile.profiler:litert_cells",
    "engine": "dscompile.profiler:tensorrt_cells",
}
# Remote boards per target: the module must define remote_cells(path, remote, profile, batch, **keywords).
REMOTE_SOURCES: dict[str, str] = {
    "jetson-orin": "dscompile.targets.tensorrt_remote:remote_cells",
    "snapdragon": "dscompile.targets.tflite_remote:remote_cells",
}
REMOTE_KIND = {"jetson-orin": "ssh", "snapdragon": "adb"}  # how each target's boards are reached
PRECISION_ORDER = ("fp32", "fp16", "int8", "int16x8", "mixed")


@dataclass(frozen=True)
class Subject:
    """One thing to profile: a model or a built artifact, with what it runs at."""

    name: str
    path: Path  # the runnable file (ONNX, .tflite, .engine)
    kind: str  # onnx | tflite | engine
    precision: str  # fp32 for a source model; the artifact's precision otherwise ("mixed" when several)
    graph: onnx.ModelProto | None  # float ONNX for the estimate (None: no estimate possible)
    layer_precisions: dict[str, str] = field(default_factory=dict)  # anchor node -> precision (artifacts)
    is_artifact: bool = False
    report: dict = field(default_factory=dict)  # the build's report.json, when there is one


@dataclass(frozen=True)
class ProfileOptions:
    devices: tuple[str, ...] = (THIS_CPU,)
    precisions: tuple[str, ...] = (FP32,)
    batches: tuple[int, ...] = (1,)
    settings: Settings = field(default_factory=Settings)
    remote: str | None = None
    ingest: IngestOptions = field(default_factory=IngestOptions)
    benchmark_binary: Path | None = None  # TFLite benchmark_model to push for --remote adb:SERIAL


def load_subject(path: Path, options: IngestOptions, workdir: Path) -> Subject:
    """A model file, an artifact file, or a build folder (``report.json`` + its model)."""
    if path.is_dir():
        return _build_folder(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    kind = file_kind(path)
    if kind == "tflite":
        return Subject(path.stem, path, "tflite", _report_precision(path), None, is_artifact=True)
    if kind == "engine":
        return Subject(path.stem, path, "engine", _report_precision(path), _sibling_onnx(path), is_artifact=True)
    fmt = detect_format(path)
    if fmt == "onnx":
        model = _concrete_inputs(load_onnx(path), _known_shapes(path, options))
        return _onnx_subject(path.name.split(".")[0], path, model)
    graph = ingest(path, options).graph  # torch source: export once, measure the export
    onnx_path = workdir / f"{path.stem}.onnx"
    onnx.save(graph.model, str(onnx_path))
    return Subject(path.name.split(".")[0], onnx_path, "onnx", FP32, graph.model)


def _known_shapes(path: Path, options: IngestOptions) -> dict[str, tuple]:
    """Input shapes from the user (--input-shape) or from the artifact's report."""
    shapes = {s.name: s.shape for s in options.input_shapes}
    for report in (path.with_suffix(".report.json"), path.parent / "report.json"):
        if report.is_file():
            try:
                for spec in json.loads(report.read_text()).get("inputs", []):
                    shapes.setdefault(spec["name"], tuple(spec["shape"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
            break
    return shapes


def _concrete_inputs(model: onnx.ModelProto, shapes: dict[str, tuple]) -> onnx.ModelProto:
    """The model with the given integer sizes on its dynamic input axes (for the estimate only)."""
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        given = shapes.get(vi.name)
        if not given or len(given) != len(dims):
            continue
        for d, size in zip(dims, given, strict=True):
            if isinstance(size, int) and size > 0 and not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = size
    return model


def _onnx_subject(name: str, path: Path, model: onnx.ModelProto) -> Subject:
    float_model, precisions = fold_qdq(model)
    if not precisions:
        return Subject(name, path, "onnx", FP32, model)
    kinds = set(precisions.values())
    anchors = sum(1 for n in float_model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose"))
    precision = kinds.pop() if len(kinds) == 1 and len(precisions) >= anchors else "mixed"
    return Subject(name, path, "onnx", precision, float_model, precisions, is_artifact=True)


def _build_folder(folder: Path) -> Subject:
    report = folder / "report.json"
    if not report.is_file():
        raise InputError(f"{folder}: not a build folder (no report.json)")
    data = json.loads(report.read_text())
    primary = next((a["path"] for a in data.get("artifacts", []) if a.get("role") == "model"), None)
    for candidate in (primary, "model.qdq.onnx", "model.onnx", "model.tflite", "model.engine"):
        if candidate and (folder / candidate).is_file():
            sub = load_subject(folder / candidate, IngestOptions(), folder)
            return Subject(folder.name, sub.path, sub.kind, sub.precision, sub.graph, sub.layer_precisions, True, data)
    raise InputError(f"{folder}: report.json names no model file that exists in the folder")


def _report_precision(path: Path) -> str:
    """The precision a file artifact was built at, from its ``.report.json`` (unknown otherwise)."""
    report = path.with_suffix(".report.json")
    if report.is_file():
        counts = json.loads(report.read_text()).get("precision", {})
        if isinstance(counts, dict) and len(counts) == 1:
            return next(iter(counts))
        return "mixed" if counts else "unknown"
    return "unknown"


def _sibling_onnx(path: Path) -> onnx.ModelProto | None:
    for cand in (path.with_name("model.qdq.onnx"), path.with_suffix(".onnx")):
        if cand.is_file():
            return fold_qdq(onnx.load(str(cand)))[0]
    return None


def _import(spec: str) -> Callable:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def ort_cells(subject: Subject, device: str, settings: Settings) -> list[Cell]:
    return _child_cells(subject, device, settings, measure_onnx)


def litert_cells(subject: Subject, device: str, settings: Settings) -> list[Cell]:
    if importlib.util.find_spec("ai_edge_litert") is None:
        return [missing_cell(subject.name, device, subject.precision,
                             "LiteRT is not installed here: pip install -e '.[snapdragon]' (see README)")]
    return _child_cells(subject, device, settings, measure_tflite)


def tensorrt_cells(subject: Subject, device: str, settings: Settings) -> list[Cell]:
    if importlib.util.find_spec("tensorrt") is None:
        return [missing_cell(subject.name, device, subject.precision,
                             "TensorRT is not installed here (engines run where they were built: a Jetson with "
                             "JetPack, or pip install -e '.[tensorrt]' with an NVIDIA GPU)")]
    try:
        runner = _import("dscompile.targets.tensorrt:engine_cells")  # the Orin target owns engine execution
    except (ImportError, AttributeError):
        return [missing_cell(subject.name, device, subject.precision,
                             "timing an engine in process is not in this build: profile its build folder with "
                             "--remote user@host to build and time it on the board")]
    return runner(subject.path, device, settings)


def _child_cells(subject: Subject, device: str, settings: Settings, fn) -> list[Cell]:
    try:
        result = in_child(fn, str(subject.path), settings)
    except InputError as exc:
        return [missing_cell(subject.name, device, subject.precision, f"measurement failed: {exc}")]
    timings = {int(b): t for b, t in result["timings"].items()}
    common = dict(runtime=result["runtime"], machine=result["machine"], threads=result["threads"],
                  peak_memory_mb=result["peak_memory_mb"])
    src = f"measured: {result['runtime']} on {result['machine']}, {result['threads']} threads"
    best = max(timings, key=lambda b: b * 1e3 / timings[b]["p50_ms"])
    search = {"best_batch": best, "search": result["note"]}
    cells = []
    for b in sorted({1, best}):
        t = timings[b]
        cells.append(measured_cell(subject.name, device, subject.precision, b, t["p50_ms"], t["p99_ms"],
                                   source=src, extra={"runs": t["runs"], **search}, **common))
    return cells


def measured(subject: Subject, device: str, settings: Settings) -> list[Cell]:
    if subject.kind not in SOURCES:
        return [missing_cell(subject.name, device, subject.precision, f"no runtime for {subject.kind} files")]
    return _import(SOURCES[subject.kind])(subject, device, settings)


def remote_device(remote_addr: str, profiles: Sequence[DeviceProfile]) -> DeviceProfile:
    """The listed device ``--remote`` measures: the first whose target's boards are reached that way."""
    kind = "adb" if remote_addr.startswith("adb:") else "ssh"
    for prof in profiles:
        if REMOTE_KIND.get(prof.target) == kind:
            return prof
    wanted = ", ".join(t for t, k in REMOTE_KIND.items() if k == kind)
    raise InputError(f"--remote {remote_addr}: no device of target {wanted} in --devices to measure it as "
                     f"(user@host[:port] reaches a Jetson over SSH, adb:SERIAL a phone)")


def remote(subject: Subject, profile: DeviceProfile, remote_addr: str, options: ProfileOptions) -> list[Cell]:
    """Cells measured on the board at ``remote_addr``; a board that cannot be reached raises (one line)."""
    fn = _import(REMOTE_SOURCES[profile.target])
    shapes = {}
    if subject.graph is not None:
        for vi in subject.graph.graph.input:
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)
            shapes[vi.name] = dims
    return fn(subject.path, remote_addr, profile, options.batches[0], model=subject.name, precision=subject.precision,
              shapes=shapes, benchmark_binary=options.benchmark_binary)


# Where a build's report keeps a timing taken on the board (the Jetson target's SSH trtexec run).
REPORT_TIMINGS = (("engine", "timing"), ("remote_timing",))


def report_cells(subject: Subject, device: str) -> list[Cell]:
    """Measured cells a build recorded on its device (a stand-in replay is never reported as measured)."""
    if subject.report.get("device") != device:
        return []
    cells = []
    for path in REPORT_TIMINGS:
        timing = subject.report
        for key in path:
            timing = timing.get(key, {}) if isinstance(timing, dict) else {}
        if not isinstance(timing, dict) or timing.get("kind") != "measured":
            continue
        lat = timing.get("latency_ms", {})
        p50 = lat.get("median", lat.get("p50"))
        if not p50:
            continue
        cells.append(measured_cell(
            subject.name, device, subject.precision, 1, float(p50), float(lat.get("p99", p50)),
            source=f"measured: {timing.get('where', 'on the board')}", runtime=f"TensorRT {timing.get('tensorrt', '?')}",
            machine=str(timing.get("board", device)),
        ))
    return cells


def estimated(subject: Subject, profile: DeviceProfile, precision: str, batch: int) -> Cell:
    if precision == "mixed" and not subject.layer_precisions:
        return missing_cell(subject.name, profile.id, precision,
                            "mixed precision comes from a plan: profile a built artifact", batch)
    if subject.graph is None:
        return missing_cell(subject.name, profile.id, precision,
                            f"no ONNX graph to estimate a {subject.kind} file from (profile its ONNX source)", batch)
    eff = efficiency_for(profile)
    try:
        layers = extract_layers(subject.graph, eff.unfused_ops)
    except InputError as exc:
        return missing_cell(subject.name, profile.id, precision, f"cannot estimate: {exc}", batch)
    per_layer = subject.layer_precisions if precision in ("mixed", subject.precision) and subject.is_artifact else {}
    default = FP32 if per_layer else precision
    latency, _ = model_estimate(profile, layers, per_layer, batch, default=default)
    src = f"estimated: {source_of(profile, eff, default if not per_layer else 'int8')}"
    return estimated_cell(subject.name, profile.id, precision, batch, latency, src)


def profile_subjects(subjects: Sequence[Subject], options: ProfileOptions) -> FpsMatrix:
    """Every subject on every device: measured on this CPU (and remote boards), estimated elsewhere."""
    matrix = FpsMatrix()
    profiles = {d: get_device(d) for d in options.devices if d != THIS_CPU}
    # The board first: one that cannot be reached fails before minutes of measuring here.
    board = remote_device(options.remote, list(profiles.values())) if options.remote else None
    on_board = [remote(sub, board, options.remote, options) for sub in subjects] if board else []
    for i, sub in enumerate(subjects):
        # A float artifact is a model: estimate it at every requested precision.
        precisions = (sub.precision,) if sub.is_artifact and sub.precision != FP32 else options.precisions
        for device in options.devices:
            if device == THIS_CPU:
                matrix.add(measured(sub, device, options.settings))
                for p in precisions:
                    if p != sub.precision:
                        matrix.add(missing_cell(sub.name, device, p,
                                                f"no {p} artifact of {sub.name} given: build one "
                                                f"(dscompile --target ort-cpu ...) and profile it"))
                continue
            prof = profiles[device]
            matrix.add(report_cells(sub, device))
            if board is not None and device == board.id:
                matrix.add(on_board[i])
            for p in precisions:
                for b in options.batches:
                    matrix.add(estimated(sub, prof, p, b))
    return matrix


def profile_paths(paths: Sequence[Path], options: ProfileOptions) -> FpsMatrix:
    with tempfile.TemporaryDirectory(prefix="dscompile-profile-") as tmp:
        subjects = [load_subject(Path(p), options.ingest, Path(tmp)) for p in paths]
        return profile_subjects(subjects, options)
