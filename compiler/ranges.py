"""Activation ranges for a plan: from the calibration table, per the target's scheme."""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from dscompile.calibration.table import CalibrationTable, TensorRange
from dscompile.compiler.capabilities import ActivationScheme


def full_range_tensors(model: onnx.ModelProto, scheme: ActivationScheme) -> frozenset[str]:
    """Outputs of the scheme's ``full_range_ops``: their amax is the observed absmax."""
    ops = set(scheme.full_range_ops)
    return frozenset(o for n in model.graph.node if n.op_type in ops for o in n.output[:1])


def scheme_amax(tr: TensorRange, scheme: ActivationScheme, full_range: bool = False) -> float:
    """The symmetric threshold the scheme quantizes a tensor at."""
    return float(tr.absmax) if full_range or scheme.method == "minmax" else tr.threshold(scheme.method)


def activation_range(tr: TensorRange, scheme: ActivationScheme, full_range: bool = False) -> tuple[float, float]:
    """[lo, hi] the quantiser covers: min/max, clipped to the method's threshold unless minmax
    (or ``full_range``: a tensor of the scheme's ``full_range_ops``)."""
    if scheme.method == "minmax" or full_range:
        lo, hi = tr.min, tr.max
    else:
        amax = tr.threshold(scheme.method)
        lo, hi = max(tr.min, -amax), min(tr.max, amax)
    if scheme.symmetric:
        m = max(abs(lo), abs(hi))
        return -m, m
    return float(lo), float(hi)


def table_ranges(table: CalibrationTable | None, tensors: Iterable[str], scheme: ActivationScheme,
                 full_range: frozenset[str] = frozenset()) -> dict[str, tuple[float, float]]:
    """Ranges of the named tensors the table has (the others are left out)."""
    if table is None:
        return {}
    out = {}
    for t in tensors:
        if t in table.tensors:
            out[t] = activation_range(table.tensors[t], scheme, t in full_range)
    return out


def range_json(lo: float, hi: float, method: str, symmetric: bool) -> dict:
    if symmetric:
        return {"amax": round(max(abs(lo), abs(hi)), 8)}
    return {"min": round(lo, 8), "max": round(hi, 8)}


def range_from_json(entry: dict) -> tuple[float, float]:
    if "amax" in entry:
        a = float(entry["amax"])
        return -a, a
    return float(entry["min"]), float(entry["max"])
