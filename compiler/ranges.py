"""Activation ranges for a plan: from the calibration table, per the target's scheme."""

from __future__ import annotations

from collections.abc import Iterable

from dscompile.calibration.table import CalibrationTable, TensorRange
from dscompile.compiler.capabilities import ActivationScheme


def activation_range(tr: TensorRange, scheme: ActivationScheme) -> tuple[float, float]:
    """[lo, hi] the quantiser covers: min/max, clipped to the method's threshold unless minmax."""
    if scheme.method == "minmax":
        lo, hi = tr.min, tr.max
    else:
        amax = tr.threshold(scheme.method)
        lo, hi = max(tr.min, -amax), min(tr.max, amax)
    if scheme.symmetric:
        m = max(abs(lo), abs(hi))
        return -m, m
    return float(lo), float(hi)


def table_ranges(table: CalibrationTable | None, tensors: Iterable[str], scheme: ActivationScheme) -> dict[str, tuple[float, float]]:
    """Ranges of the named tensors the table has (the others are left out)."""
    if table is None:
        return {}
    out = {}
    for t in tensors:
        if t in table.tensors:
            out[t] = activation_range(table.tensors[t], scheme)
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
