"""Batch compilation from a manifest: every model x target compiled, verified and profiled.

    [batch]                              # defaults for every model
    targets = ["ort-cpu"]
    devices = ["this-cpu", "jetson-agx-orin-64gb"]
    precisions = ["fp32", "int8"]

    [[model]]
    name = "digits"                      # default: the file's stem
    path = "digits.pt"                   # relative to the manifest
    input_shapes = ["x:1x1x8x8"]
    calib = "calib.npy"                  # optional: calibration data
    preprocess = { mean = [0.5], std = [0.25] }   # optional, with calib
    budget = "latency=0.5"               # optional
    targets = ["ort-cpu"]                # optional: overrides [batch]

A job is one (model, target). Its folder ``OUT/<name>.<target>/`` holds the
artifact, its report, the job's matrix cells and ``job.json`` (status, one-line
reason, content key). A job whose key (hashes of the model and calibration
files, its settings and the dscompile version) matches a successful
``job.json`` is up to date and skipped. A failing job is recorded and the
batch goes on.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from dscompile import __version__
from dscompile.errors import DscompileError, InputError
from dscompile.fileio import sha256_file, write_json

MARKER = "batch.json"
OPTIONAL_KEYS = ("calib", "preprocess", "budget")


@dataclass(frozen=True)
class Job:
    name: str
    path: str
    target: str
    folder: str
    devices: tuple[str, ...]
    precisions: tuple[str, ...]
    input_shapes: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)  # calib, preprocess, budget (as the manifest gives them)
    key: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Job:
        return cls(**{**d, "devices": tuple(d["devices"]), "precisions": tuple(d["precisions"]),
                      "input_shapes": tuple(d["input_shapes"])})


def load_manifest(path: Path, out: Path) -> list[Job]:
    """The jobs of a manifest; a malformed entry is an error naming the manifest and the entry."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such manifest") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None
    defaults = data.get("batch", {})
    models = data.get("model", [])
    if not isinstance(models, list) or not models:
        raise InputError(f"{path}: no [[model]] entries")
    jobs: list[Job] = []
    for i, entry in enumerate(models):
        where = f"{path}: [[model]] #{i + 1}"
        if not isinstance(entry, dict) or not entry.get("path"):
            raise InputError(f"{where} has no path")
        src = (path.parent / str(entry["path"])).resolve()
        name = str(entry.get("name") or src.name.split(".")[0])
        targets = _strings(entry.get("targets", defaults.get("targets", ["ort-cpu"])), f"{where}.targets")
        devices = _strings(entry.get("devices", defaults.get("devices", ["this-cpu"])), f"{where}.devices")
        precisions = _strings(entry.get("precisions", defaults.get("precisions", ["fp32"])), f"{where}.precisions")
        shapes = _strings(entry.get("input_shapes", []), f"{where}.input_shapes")
        opts = {k: entry[k] for k in OPTIONAL_KEYS if k in entry}
        if "calib" in opts:
            opts["calib"] = str((path.parent / str(opts["calib"])).resolve())
        for target in targets:
            jobs.append(Job(name, str(src), target, str(out / f"{name}.{target}"), devices, precisions, shapes, opts))
    names = [(j.name, j.target) for j in jobs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise InputError(f"{path}: model {dup[0]!r} appears twice for target {dup[1]!r} (give each a distinct name)")
    return jobs


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where} must be a list of strings")
    return tuple(value)


def job_key(job: Job) -> str:
    """Content hash of everything the job's result depends on (missing files hash as their name)."""
    h = hashlib.sha256()
    for f in (job.path, job.options.get("calib")):
        if f:
            h.update((sha256_file(f) if Path(f).is_file() else f"missing:{f}").encode())
    spec = {k: v for k, v in job.to_json().items() if k not in ("key", "folder")}
    h.update(json.dumps(spec, sort_keys=True, default=str).encode())
    h.update(__version__.encode())
    return h.hexdigest()


def up_to_date(job: Job) -> bool:
    rec = Path(job.folder) / "job.json"
    if not rec.is_file():
        return False
    try:
        data = json.loads(rec.read_text())
    except json.JSONDecodeError:
        return False
    return data.get("status") == "ok" and data.get("key") == job.key


def run_job(job_json: dict[str, Any]) -> dict[str, Any]:
    """Compile, verify and profile one job; never raises (a failure is returned with its reason).

    Takes and returns plain dicts so any executor (worker process, Ray task) can run it.
    """
    job = Job.from_json(job_json)
    start = time.perf_counter()
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        artifact, report = _compile(job)
        cells = _profile(job, artifact)
        write_json(folder / "cells.json", {"rows": cells}, force=True)
        result = {"status": "ok", "reason": "", "artifact": str(artifact), "report": str(report)}
    except DscompileError as exc:
        result = {"status": "failed", "reason": " ".join(str(exc).split())}
    except Exception as exc:  # an internal error in one job must not stop the batch
        last = traceback.extract_tb(exc.__traceback__)[-1]
        result = {"status": "failed",
                  "reason": f"internal error {type(exc).__name__}: {' '.join(str(exc).split())[:200]} "
                            f"({Path(last.filename).name}:{last.lineno})"}
    result.update(name=job.name, target=job.target, key=job.key, seconds=round(time.perf_counter() - start, 2))
    write_json(folder / "job.json", result, force=True)
    return result


def _compile(job: Job) -> tuple[Path, Path]:
    from dscompile import api
    from dscompile.compiler.ingest import IngestOptions
    from dscompile.compiler.shapes import parse_input_shape
    from dscompile.pipeline import CompileOptions, report_path_for
    from dscompile.targets.base import get_target

    target = get_target(job.target)
    out = Path(job.folder) / ("artifact" if target.output_kind == "dir" else f"{job.name}{target.suffix}")
    ingest = IngestOptions(input_shapes=tuple(parse_input_shape(s, i) for i, s in enumerate(job.input_shapes)))
    known = {f.name for f in fields(CompileOptions)}
    direct = {k: v for k, v in job.options.items() if k in known}
    extra = {k: v for k, v in job.options.items() if k not in known}
    # the profile step measures latency (and more): the compile need not time it too
    opts = CompileOptions(target=job.target, output=out, force=True, ingest=ingest, extra=extra,
                          measure_latency=False, **direct)
    result = api.compile(job.path, target=job.target, options=opts)
    return result.output, report_path_for(result.output, target.output_kind)


def _profile(job: Job, artifact: Path) -> list[dict[str, Any]]:
    from dscompile import profiler

    opts = profiler.ProfileOptions(devices=job.devices, precisions=job.precisions)
    matrix = profiler.profile_paths([artifact], opts)
    return [dict(c.to_json(), model=job.name) for c in matrix.cells]


@dataclass
class BatchResult:
    results: list[dict[str, Any]]
    matrix_dir: Path
    summary_path: Path

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r["status"] == "failed"]


def prepare_output(out: Path, force: bool) -> None:
    """OUT may hold an earlier batch (re-run: up-to-date jobs are skipped); anything else needs --force."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not force:
        raise InputError(f"{out}: is not empty and holds no earlier batch (use --force to write into it)")
    out.mkdir(parents=True, exist_ok=True)


def run_batch(manifest: Path, out: Path, jobs: int = 1, executor: str = "local", force: bool = False) -> BatchResult:
    """Run every job not up to date, then write summary.json and the merged matrix in OUT/matrix/."""
    from dscompile.executors import parse_executor, run_all
    from dscompile.profiles.devices import THIS_CPU, get_device
    from dscompile.profiles.matrix import Cell, FpsMatrix, save_matrix
    from dscompile.targets.base import get_target

    parse_executor(executor)
    todo = load_manifest(manifest, out)
    for j in todo:  # fail fast on names, before any work
        get_target(j.target)
        for d in j.devices:
            if d != THIS_CPU:
                get_device(d)
    prepare_output(out, force)
    write_json(out / MARKER, {"manifest": str(manifest), "dscompile": __version__}, force=True)
    todo = [Job(**{**asdict(j), "key": job_key(j)}) for j in todo]
    pending = [j for j in todo if force or not up_to_date(j)]
    fresh = {(r["name"], r["target"]): r for r in run_all(run_job, [j.to_json() for j in pending], executor, jobs)}
    results = []
    for j in todo:
        r = fresh.get((j.name, j.target))
        if r is None:
            r = {**json.loads((Path(j.folder) / "job.json").read_text()), "status": "up to date"}
        results.append(r)
    matrix = FpsMatrix()
    for j in todo:
        cells = Path(j.folder) / "cells.json"
        if cells.is_file():
            matrix.add(Cell.from_json(row) for row in json.loads(cells.read_text())["rows"])
    summary = out / "summary.json"
    write_json(summary, {"manifest": str(manifest), "executor": executor, "jobs": results}, force=True)
    matrix_dir = out / "matrix"
    if matrix.cells:
        save_matrix(matrix, matrix_dir, force=True, title=f"FPS at batch 1 ({manifest.name})")
    return BatchResult(results, matrix_dir, summary)
