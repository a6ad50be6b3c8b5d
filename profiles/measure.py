"""Measured latency on this machine: warm-up, runs until the median is stable, p50/p99,
the best batch, threads and the peak memory of the process that ran it.

Each measurement runs in a fresh child process, so the peak resident memory is
that of the runtime with the model loaded (plus the Python interpreter), and a
crash in a runtime takes only the child down.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dscompile.errors import InputError

Feed = dict[str, np.ndarray]
BATCHES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Settings:
    threads: int | None = None
    min_runs: int = 30
    max_runs: int = 2000
    budget_s: float = 3.0  # per batch size
    stable_tol: float = 0.02  # stop when two successive medians differ by less than this
    best_batch: bool = True
    max_batch: int = 32


def stable_timing(run, feed: Feed, settings: Settings) -> dict[str, float]:
    """Warm up, then time rounds of runs until the running median is stable (or the budget ends)."""
    for _ in range(3):
        run(feed)
    times: list[float] = []
    start = time.perf_counter()
    last = None
    while len(times) < settings.max_runs:
        for _ in range(10):
            t0 = time.perf_counter()
            run(feed)
            times.append((time.perf_counter() - t0) * 1e3)
        med = float(np.median(times))
        stable = last is not None and abs(med - last) <= settings.stable_tol * last
        if len(times) >= settings.min_runs and (stable or time.perf_counter() - start > settings.budget_s):
            break
        last = med
    arr = np.array(times)
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "mean_ms": float(arr.mean()), "runs": len(times)}


def batched(feed: Feed, batch: int) -> Feed:
    return {k: np.repeat(v, batch, axis=0) if v.ndim else v for k, v in feed.items()}


def sweep(make_run, feed: Feed, settings: Settings) -> tuple[dict[int, dict[str, float]], str]:
    """Timings at batch 1 and growing batches while throughput still rises (>5%); note why it stopped."""
    out: dict[int, dict[str, float]] = {}
    run = make_run(1)
    out[1] = stable_timing(run, feed, settings)
    note = "best batch search off"
    if not settings.best_batch:
        return out, note
    best = 1e3 / out[1]["p50_ms"]
    note = f"throughput stopped rising by 5% beyond batch {BATCHES[-1]}"
    for b in BATCHES[1:]:
        if b > settings.max_batch:
            note = f"stopped at the batch limit {settings.max_batch}"
            break
        try:
            t = stable_timing(make_run(b), batched(feed, b), settings)
        except Exception as exc:  # a model with a fixed batch dimension
            note = f"batch {b} does not run ({str(exc).splitlines()[0][:120]})"
            break
        out[b] = t
        fps = b * 1e3 / t["p50_ms"]
        if fps < best * 1.05:
            note = f"throughput stopped rising by 5% at batch {b}"
            break
        best = fps
    return out, note


def peak_rss_mb() -> float:
    """Peak resident set size of this process's own address space.

    Linux's ru_maxrss survives exec: a spawned child reports its parent's resident size at fork time
    (the same figure for every model). VmHWM belongs to the current address space, so it reads it first.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if os.uname().sysname != "Darwin" else peak / 2**20


def in_child(fn, *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a fresh spawned process; return its dict or raise its error as InputError."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        result = pool.apply(_guarded, (fn, *args))
    if "error" in result:
        raise InputError(result["error"])
    return result


def _guarded(fn, *args: Any) -> dict[str, Any]:
    try:
        return fn(*args)
    except Exception as exc:  # reported to the parent as one line
        return {"error": " ".join(str(exc).split())[:300] or type(exc).__name__}


def measure_onnx(path: str, settings: Settings) -> dict[str, Any]:
    """onnxruntime CPU: timings per batch, threads used, peak memory. Runs in the child."""
    import onnx
    import onnxruntime as ort

    from dscompile.compiler.graph import graph_inputs
    from dscompile.compiler.samples import synthetic_feeds
    from dscompile.profiles.host import host_label

    model = onnx.load(path)
    specs = graph_inputs(model)
    feed = synthetic_feeds(specs, 1, 0, model)[0]
    dynamic = _dynamic_batch_copy(model)
    threads = settings.threads or os.cpu_count() or 1

    def make_run(batch: int):
        so = ort.SessionOptions()
        so.log_severity_level = 4  # a batch the model cannot take is expected in the sweep: no stderr noise
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        src = path if batch == 1 else dynamic.SerializeToString()
        sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        return lambda f: sess.run(None, f)

    timings, note = sweep(make_run, feed, settings)
    return {"timings": timings, "note": note, "threads": threads, "peak_memory_mb": peak_rss_mb(),
            "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider", "machine": host_label()}


def measure_tflite(path: str, settings: Settings) -> dict[str, Any]:
    """LiteRT CPU (XNNPACK) interpreter at batch 1. Runs in the child."""
    from ai_edge_litert import interpreter as litert

    from dscompile.profiles.host import host_label

    threads = settings.threads or os.cpu_count() or 1
    interp = litert.Interpreter(model_path=path, num_threads=threads)
    interp.allocate_tensors()
    rng = np.random.default_rng(0)
    details = interp.get_input_details()
    feed = {}
    for d in details:
        dtype = np.dtype(d["dtype"])
        shape = tuple(int(x) for x in d["shape"])
        feed[d["index"]] = (rng.standard_normal(shape).astype(dtype) if dtype.kind == "f"
                            else rng.integers(-8, 8, shape).astype(dtype))

    def run(f):
        for idx, v in f.items():
            interp.set_tensor(idx, v)
        interp.invoke()

    timing = stable_timing(run, feed, settings)
    version = getattr(litert, "__version__", None) or _dist_version("ai-edge-litert")
    return {"timings": {1: timing}, "note": "LiteRT runs the batch the model was converted with", "threads": threads,
            "peak_memory_mb": peak_rss_mb(), "runtime": f"LiteRT {version} CPU (XNNPACK)", "machine": host_label()}


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def _dynamic_batch_copy(model):
    """The model with a symbolic leading dimension on inputs and outputs (for the batch sweep)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    for vi in [*m.graph.input, *m.graph.output]:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = "batch"
    del m.graph.value_info[:]
    return m


def file_kind(path: Path) -> str:
    """onnx | tflite | engine | unknown, from the bytes and name."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[4:8] == b"TFL3":
        return "tflite"
    if path.suffix in (".engine", ".plan", ".trt"):
        return "engine"
    if path.suffix == ".onnx":
        return "onnx"
    return "unknown"
