"""Hexagon NPU compatibility: where each op of a .tflite runs under the Qualcomm QNN delegate.

Per op and precision: the HTP (NPU), the Adreno GPU, or a CPU fallback, from
``rules/qnn_htp_ops.toml`` (Qualcomm's and LiteRT's op support, with sources).
Fallbacks split the delegated graph into partitions, and every partition
boundary is a round trip between the NPU and the CPU: they are what kill
mobile latency, so the report lists them first.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from dscompile.compiler.capabilities import (
    FP16,
    FP32,
    INT4_WEIGHT,
    INT8,
    INT8_DYNAMIC,
    INT8_WEIGHT,
    INT16X8,
)
from dscompile.errors import InputError
from dscompile.profiles.devices import DeviceProfile
from dscompile.targets.tflite_flatbuffer import TflGraph, TflOp

RULES_FILE = Path(__file__).parent / "rules" / "qnn_htp_ops.toml"
HTP, GPU, CPU = "HTP", "GPU", "CPU"
_WEIGHT_ONLY = {"int8": INT8_WEIGHT, "int4": INT4_WEIGHT, "float16": FP16}
_BOUNDARY = ("QUANTIZE", "DEQUANTIZE")


@dataclass(frozen=True)
class QnnRules:
    ops: frozenset[str]
    htp: frozenset[str]
    htp_float: frozenset[str]
    gpu: frozenset[str]
    onnx_to_tflite: Mapping[str, tuple[str, ...]]
    sources: Mapping[str, str]
    file: str

    def unit(self, op: str, precision: str, htp_fp16: bool = True) -> tuple[str, str]:
        """(HTP | GPU | CPU, why) for one op at one precision."""
        if op not in self.ops:
            return CPU, f"{op} is not in the QNN delegate's op list"
        if precision in self.htp and (htp_fp16 or precision not in self.htp_float):
            return HTP, ""
        if precision in self.gpu:
            why = "this device's HTP has no FP16" if precision in self.htp else f"the HTP does not run {precision}"
            return GPU, why
        return CPU, f"neither the HTP nor the GPU backend runs {op} at {precision}"


@functools.cache
def load_rules(path: Path = RULES_FILE) -> QnnRules:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: cannot read the QNN op rules ({exc})") from None
    sources = {k: str(v.get("source", "")) for k, v in data.get("sources", {}).items()}
    if not sources or not all(sources.values()):
        raise InputError(f"{path}: every [sources.*] table needs a source")
    try:
        return QnnRules(
            frozenset(data["ops"]["qnn"]), frozenset(data["htp"]["precisions"]),
            frozenset(data["htp"]["float_precisions"]), frozenset(data["gpu"]["precisions"]),
            {k: tuple(v) for k, v in data["onnx_to_tflite"].items()}, sources, str(path),
        )
    except KeyError as exc:
        raise InputError(f"{path}: missing key {exc}") from None


def op_precision(graph: TflGraph, op: TflOp, producer: Mapping[int, TflOp]) -> str:
    """The precision an op of a built .tflite runs at, read from its tensors' types."""
    t = graph.tensors
    outs = [t[i] for i in op.outputs if i >= 0]
    acts = [t[i] for i in op.inputs if i >= 0 and not t[i].constant] + outs
    if op.name in _BOUNDARY:
        src = t[op.inputs[0]] if op.inputs else None
        if op.name == "DEQUANTIZE" and src is not None and src.constant:
            return _WEIGHT_ONLY.get(src.dtype, FP32)
        q = next((a for a in acts if a.dtype in ("int8", "int16")), None)
        return INT16X8 if q is not None and q.dtype == "int16" else INT8
    dtypes = {a.dtype for a in acts}
    if "int16" in dtypes and any(a.quantized for a in acts):
        return INT16X8
    if "int8" in dtypes and any(a.quantized for a in acts):
        return INT8
    if outs and not any(o.dtype in ("float32", "float16") for o in outs):
        return outs[0].dtype  # index arithmetic, comparisons (int64, bool, ...)
    weights = [t[i] for i in op.inputs if i >= 0 and t[i].constant]
    if any(w.dtype in ("int8", "int4") for w in weights):
        return INT8_DYNAMIC  # float activations with integer weights: a hybrid kernel
    for i in op.inputs:
        src = producer.get(i)
        if src is not None and src.name == "DEQUANTIZE" and t[src.inputs[0]].constant:
            return _WEIGHT_ONLY.get(t[src.inputs[0]].dtype, FP32)
    return FP32


def htp_has_fp16(profile: DeviceProfile | None) -> bool:
    return bool(profile.value("htp_fp16_supported", 0.0)) if profile is not None else True


def compat_report(
    graph: TflGraph, profile: DeviceProfile | None, onnx_of: Mapping[str, tuple[str, ...]] = {},
    rules: QnnRules | None = None,
) -> dict[str, Any]:
    """Per op: precision and compute unit; fallbacks named with their ONNX nodes; partitions."""
    rules = rules or load_rules()
    fp16 = htp_has_fp16(profile)
    producer = graph.producer()
    rows, units = [], []
    for op in graph.ops:
        precision = op_precision(graph, op, producer)
        unit, why = rules.unit(op.name, precision, fp16)
        names = [graph.tensors[i].name for i in op.outputs if i >= 0]
        onnx = sorted({n for name in names for n in onnx_of.get(name, ())})
        rows.append({"index": op.index, "op": op.name, "precision": precision, "unit": unit,
                     "onnx": onnx, **({"why": why} if why else {})})
        units.append(unit)
    table: Counter[tuple[str, str, str]] = Counter((r["op"], r["precision"], r["unit"]) for r in rows)
    fallbacks = [r for r in rows if r["unit"] != HTP]
    return {
        "delegate": "Qualcomm QNN delegate, HTP backend (NPU); GPU and CPU as fallbacks",
        "device": profile.id if profile is not None else None,
        "htp_fp16": fp16,
        "kind": "estimated from op support tables, not measured",
        "sources": {**rules.sources, "rules_file": Path(rules.file).name},
        "summary": {u: units.count(u) for u in (HTP, GPU, CPU)},
        "fully_on_npu": not fallbacks,
        "htp_partitions": _partitions(units),
        "table": [{"op": o, "precision": p, "unit": u, "count": c} for (o, p, u), c in sorted(table.items())],
        "fallbacks": fallbacks,
    }


def _partitions(units: list[str]) -> int:
    """Contiguous runs of HTP ops in execution order: each is one delegate partition."""
    return sum(1 for i, u in enumerate(units) if u == HTP and (i == 0 or units[i - 1] != HTP))


def layer_runs_on_htp(rules: QnnRules, onnx_op: str, precision: str, htp_fp16: bool) -> tuple[bool, str]:
    """Before conversion: does a layer anchored on ``onnx_op`` stay on the HTP at ``precision``?"""
    tfl_ops = rules.onnx_to_tflite.get(onnx_op, ())
    if not tfl_ops:
        return True, ""  # not a layer anchor the rules know: no penalty claimed
    unit, why = rules.unit(tfl_ops[0], precision, htp_fp16)
    return unit == HTP, why

