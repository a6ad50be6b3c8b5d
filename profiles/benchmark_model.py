"""Parse the output of TensorFlow Lite's ``benchmark_model`` tool into measured numbers.

The lines it prints (tensorflow/lite/tools/benchmark/benchmark_model.cc and
benchmark_tflite_model.cc), with or without an ``INFO: `` prefix:

    Initialized session in 3.337ms.
    Running benchmark for at least 1 iterations and at least 0.5 seconds ...
    count=9 first=81913 curr=55502 min=55502 max=81913 avg=58984.7 std=8115
    Running benchmark for at least 50 iterations and at least 1 seconds ...
    count=1061 first=56576 curr=56299 min=54669 max=60236 avg=56265.8 std=982 [p5=... median=... p95=...]
    Inference timings in us: Init: 3337, First inference: 81913, Warmup (avg): 58984.7, Inference (avg): 56265.8
    Memory footprint delta from the start of the tool (MB): init=4.58984 overall=7.82031
    Overall peak memory footprint (MB) via periodic monitoring: 93.2383
    Replacing 58 out of 58 node(s) with delegate (TfLiteXNNPackDelegate) node, yielding 1 partitions ...
    TfLiteQnnDelegate delegate: 163 nodes delegated out of 163 nodes with 1 partitions.   (QNN delegate)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dscompile.errors import InputError

_NUM = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_TIMINGS = re.compile(
    rf"Inference timings in us: Init: {_NUM}, First inference: {_NUM}, Warmup \(avg\): {_NUM}, Inference \(avg\): {_NUM}"
)
_STATS = re.compile(r"count=(\d+)((?: \w+=[-+0-9.eE]+)+)")
_MEMORY = re.compile(rf"Memory footprint delta from the start of the tool \(MB\): init={_NUM} overall={_NUM}")
_PEAK = re.compile(rf"Overall peak memory footprint \(MB\) via periodic monitoring: {_NUM}")
_DELEGATED = re.compile(r"Replacing (\d+) out of (\d+) node\(s\) with delegate \(([^)]+)\) node, yielding (\d+) partitions")
# The QNN delegate reports its own partitioning: "TfLiteQnnDelegate delegate: 163 nodes delegated out of 163 nodes with 1 partitions."
_QNN = re.compile(r"(\w+) delegate: (\d+) nodes delegated out of (\d+) nodes with (\d+) partitions")
_ERROR = re.compile(r"^(?:ERROR: .*|.*Benchmarking failed.*|.*Failed to .*)$", re.MULTILINE)


@dataclass(frozen=True)
class BenchmarkResult:
    """One benchmark_model run; times in milliseconds, memory in MB."""

    init_ms: float
    first_ms: float
    warmup_avg_ms: float
    avg_ms: float
    runs: int | None = None
    std_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    median_ms: float | None = None
    memory_init_mb: float | None = None
    memory_overall_mb: float | None = None
    peak_memory_mb: float | None = None
    delegate: str | None = None
    delegated_nodes: tuple[int, int] | None = None  # (replaced, total)
    partitions: int | None = None

    @property
    def fps(self) -> float:
        return 1e3 / self.avg_ms if self.avg_ms > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if v is not None}
        if self.delegated_nodes is not None:
            d["delegated_nodes"] = list(self.delegated_nodes)
        d["fps"] = round(self.fps, 3)
        return d


def parse_benchmark_output(text: str) -> BenchmarkResult:
    """Measured numbers from benchmark_model's output; InputError when it has none."""
    m = _TIMINGS.search(text)
    if not m:
        errors = _ERROR.findall(text)
        named = [e for e in errors if e.startswith("ERROR: ") and not e.rstrip().endswith(":")]
        pick = named or errors
        why = pick[-1].strip() if pick else (text.strip().splitlines() or ["no output"])[-1][:200]
        raise InputError(f"benchmark_model printed no 'Inference timings' line: {why}")
    init, first, warm, avg = (float(x) / 1e3 for x in m.groups())
    stats = [_fields(s) for s in _STATS.finditer(text[: m.start()])]
    timed = stats[-1] if stats else {}
    mem = _MEMORY.search(text)
    peak = _PEAK.search(text)
    dele = _DELEGATED.findall(text) or [(r, t, name, p) for name, r, t, p in _QNN.findall(text)]
    return BenchmarkResult(
        init, first, warm, avg,
        runs=int(timed["count"]) if "count" in timed else None,
        std_ms=_ms(timed.get("std")), min_ms=_ms(timed.get("min")), max_ms=_ms(timed.get("max")),
        median_ms=_ms(timed.get("median")),
        memory_init_mb=float(mem.group(1)) if mem else None,
        memory_overall_mb=float(mem.group(2)) if mem else None,
        peak_memory_mb=float(peak.group(1)) if peak else None,
        delegate=dele[-1][2] if dele else None,
        delegated_nodes=(int(dele[-1][0]), int(dele[-1][1])) if dele else None,
        partitions=int(dele[-1][3]) if dele else None,
    )


def _fields(m: re.Match) -> dict[str, float]:
    out = {"count": float(m.group(1))}
    for part in m.group(2).split():
        k, _, v = part.partition("=")
        out[k] = float(v)
    return out


def _ms(us: float | None) -> float | None:
    return None if us is None else us / 1e3
