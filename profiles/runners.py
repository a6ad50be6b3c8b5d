"""Runners: execute an artifact on this machine and time it.

One class per runtime; optional runtimes are imported only when used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from dscompile.compiler.runtime import ort_session, ort_version, run_session
from dscompile.profiles.host import host_label

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class Timing:
    p50_ms: float
    p99_ms: float
    mean_ms: float
    runs: int
    threads: int | None
    where: str

    def to_json(self) -> dict[str, object]:
        return {
            "ms_p50": round(self.p50_ms, 4), "ms_p99": round(self.p99_ms, 4), "ms_mean": round(self.mean_ms, 4),
            "runs": self.runs, "threads": self.threads, "kind": "measured", "where": self.where,
        }


class OrtRunner:
    """onnxruntime CPU execution provider, default session options."""

    def __init__(self, model: Path | str | onnx.ModelProto, threads: int | None = None) -> None:
        self.threads = threads
        self.session = ort_session(model, threads)

    def run(self, feed: Feed) -> list[np.ndarray]:
        return run_session(self.session, feed)

    def where(self) -> str:
        return f"onnxruntime {ort_version()} CPUExecutionProvider on {host_label()}"


def time_runner(runner, feed: Feed, min_runs: int = 20, max_runs: int = 500, budget_s: float = 2.0) -> Timing:
    """Warm up, then run until ``budget_s`` or ``max_runs``, at least ``min_runs`` times."""
    for _ in range(3):
        runner.run(feed)
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        runner.run(feed)
        times.append((time.perf_counter() - t0) * 1e3)
    arr = np.array(times)
    return Timing(
        float(np.percentile(arr, 50)), float(np.percentile(arr, 99)), float(arr.mean()), len(times),
        getattr(runner, "threads", None), runner.where(),
    )
