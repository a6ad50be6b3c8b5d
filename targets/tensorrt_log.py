"""Reading trtexec's log: TensorRT version, throughput, latency percentiles, parser and builder errors.

Formats as trtexec prints them (samples/trtexec, TensorRT 8.x and 10.x):
    &&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --onnx=...
    [I] Throughput: 130.298 qps
    [I] Latency: min = 5.38 ms, max = 13.3 ms, mean = 7.60 ms, median = 7.16 ms, percentile(90%) = ...
    [E] [TRT] ModelImporter.cpp:961: While parsing node number 267 [Conv -> "out"]:  (then the node, name: "...")
    [E] In node 61 with name: X and operator: QuantizeLinear (QuantDequantLinearHelper): INVALID_NODE: ...
A log replayed by the test stand-in carries STAND_IN_MARKER; its numbers are never measurements.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

STAND_IN_MARKER = "dscompile-test-stand-in"

_VERSION = re.compile(r"\[TensorRT v(\d+)\]")
_THROUGHPUT = re.compile(r"Throughput:\s*([0-9.eE+-]+)\s*qps")
_STAT = re.compile(r"(min|max|mean|median|percentile\(([0-9.]+)%\))\s*=?\s*([0-9.eE+-]+)\s*ms")
_WHILE = re.compile(r"While parsing node number (\d+) \[(\w+)(?: -> \"([^\"]*)\")?\]")
_NODE_NAME = re.compile(r"^\s*name:\s*\"([^\"]*)\"")
_IN_NODE = re.compile(r"In node (-?\d+) with name: (.*?) and operator: (\w+) \(\w+\): (\w+): (.*)$")
_IN_NODE_OLD = re.compile(r"In node (-?\d+) \((\w+)\): (\w+): (.*)$")
_ASSERT = re.compile(r"(?:\[\d+\]\s*)?Assertion failed: (.*)$")
_CODE_LINE = re.compile(r"^\s*\[\d+\]\s+(.*)$")  # "[6] creator && ..." after an ERROR: In function line
_BUILD_ERROR = re.compile(r"Error Code (\d+): ([^(]*)\((.*)\)?$")


@dataclass(frozen=True)
class ParserError:
    node: str
    op: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"node": self.node, "op": self.op, "message": self.message}


@dataclass(frozen=True)
class TrtexecRun:
    tensorrt: str | None
    throughput_qps: float | None
    latency_ms: dict[str, float]
    gpu_compute_ms: dict[str, float]
    passed: bool
    parser_errors: tuple[ParserError, ...] = ()
    build_errors: tuple[str, ...] = ()
    stand_in: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return bool(self.parser_errors or self.build_errors) or not self.passed

    def first_error(self) -> str:
        if self.parser_errors:
            e = self.parser_errors[0]
            return f"TensorRT's ONNX parser rejected node {e.node!r} ({e.op}): {e.message}"
        if self.build_errors:
            return f"TensorRT's builder failed: {self.build_errors[0]}"
        return "trtexec did not finish (no PASSED line in its log)"


def tensorrt_version(code: str) -> str:
    """trtexec's version code: 8602 -> 8.6.2 (8.x: M*1000+m*100+p), 100300 -> 10.3.0 (M*10000+m*100+p)."""
    n = int(code)
    if n >= 10000:
        return f"{n // 10000}.{n // 100 % 100}.{n % 100}"
    return f"{n // 1000}.{n // 100 % 10}.{n % 100}"


def _stats(line: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, pct, value in _STAT.findall(line):
        key = f"p{pct}" if pct else name
        out[key] = float(value)
    return out


def _summary_line(line: str, label: str) -> bool:
    return re.search(rf"\]\s*{label}:|^{label}:", line) is not None


def parse_log(text: str) -> TrtexecRun:
    version = _VERSION.search(text)
    throughput = _THROUGHPUT.search(text)
    latency: dict[str, float] = {}
    gpu: dict[str, float] = {}
    for line in text.splitlines():
        if _summary_line(line, "Latency") and "min" in line:
            latency = _stats(line)
        elif _summary_line(line, "GPU Compute Time") and "min" in line:
            gpu = _stats(line)
    return TrtexecRun(
        tensorrt_version(version.group(1)) if version else None,
        float(throughput.group(1)) if throughput else None,
        latency, gpu, "&&&& PASSED" in text, tuple(parser_errors(text)), tuple(build_errors(text)),
        STAND_IN_MARKER in text,
    )


def parser_errors(text: str) -> list[ParserError]:
    """Node-level errors of TensorRT's ONNX parser, in the order it reported them."""
    errors: list[ParserError] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _IN_NODE.search(line) or _IN_NODE.search(" ".join(s.strip() for s in lines[i:i + 4]))
        if m and "In node" in line:
            errors.append(ParserError(m.group(2).strip(), m.group(3), f"{m.group(4)}: {m.group(5).strip()}"))
            continue
        w = _WHILE.search(line)
        if w:
            errors.append(_while_block(lines, i, w))
    return _dedupe(errors)


def _while_block(lines: list[str], i: int, w: re.Match) -> ParserError:
    """A 'While parsing node number N [Op -> "out"]' block: the node's name and the assertion after it."""
    name, message, after_error = w.group(3) or f"node #{w.group(1)}", "", False
    for line in lines[i + 1:i + 80]:
        if _WHILE.search(line):
            break
        n = _NODE_NAME.search(line)
        if n:
            name = n.group(1)
        a = _ASSERT.search(line) or (_CODE_LINE.search(line) if after_error else None)
        if a:
            message = a.group(1).strip()
            break
        if "ERROR:" in line and "In function" in line:
            message, after_error = line.split("ERROR:", 1)[1].strip(), True
    return ParserError(name, w.group(2), message or "rejected by the ONNX parser (see trtexec.log)")


def _dedupe(errors: list[ParserError]) -> list[ParserError]:
    seen: set[str] = set()
    out = []
    for e in errors:
        if e.node not in seen:
            seen.add(e.node)
            out.append(e)
    return out


def build_errors(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        if "Error Code" in line and ("[E]" in line or "ERROR" in line):
            out.append(line.split("Error Code", 1)[1].strip())
    return out


def measured_cells(run: TrtexecRun, where: str) -> dict[str, Any]:
    """The report's engine timing: measured on the board, or marked as not a measurement."""
    kind = "stand-in replay: not a measurement" if run.stand_in else "measured"
    cell: dict[str, Any] = {"kind": kind, "where": where, "tensorrt": run.tensorrt}
    if run.throughput_qps is not None:
        cell["throughput_qps"] = run.throughput_qps
    if run.latency_ms:
        cell["latency_ms"] = run.latency_ms
    if run.gpu_compute_ms:
        cell["gpu_compute_ms"] = run.gpu_compute_ms
    return cell
