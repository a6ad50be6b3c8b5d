"""Activation ranges for a plan: from the calibration table, per the target's scheme."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
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


# ONNX ops whose output holds (a selection of) their first input's values: a floor on the output holds there.
_COPYING = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Expand", "Slice",
                      "Gather", "Tile"})


def softmax_floors(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], span: float,
                   threads: int | None = None) -> dict[str, float]:
    """Per Softmax input: the smallest row maximum (over the Softmax's axis) seen on ``feeds``, minus ``span``.

    A logit more than ``span`` below its row's maximum gets a probability no quantized softmax can
    represent, so a static range need not reach below the floor. The ONNX twin of the snapdragon
    target's floors (targets/tflite_ranges.py, measured there on the float .tflite), so that DMPQ's
    emulator quantizes an attention mask's sum the way the build does.
    """
    if span <= 0 or not feeds:
        return {}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    axes: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type == "Softmax" and n.input[0] not in axes:
            axes[n.input[0]] = next((a.i for a in n.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
    if not axes:
        return {}
    from dscompile.compiler.distill_capture import with_outputs
    from dscompile.compiler.runtime import ort_session, run_session

    m = with_outputs(model, list(axes))
    names = [o.name for o in m.graph.output]
    sess = ort_session(m, threads, optimize=False)
    inputs = {i.name for i in model.graph.input}
    lowest = dict.fromkeys(axes, np.inf)
    for feed in feeds:
        values = dict(zip(names, run_session(sess, {k: v for k, v in feed.items() if k in inputs}), strict=True))
        for t, axis in axes.items():
            v = np.asarray(values[t], np.float64)
            if v.ndim == 0 or v.size == 0:
                continue
            a = axis % v.ndim
            rows = np.max(np.where(np.isfinite(v), v, -np.inf), axis=a if opset >= 13 else tuple(range(a, v.ndim)))
            rows = rows[np.isfinite(rows)]
            if rows.size:
                lowest[t] = min(lowest[t], float(rows.min()))
    return {t: v - span for t, v in lowest.items() if np.isfinite(v)}


def apply_softmax_floors(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]],
                         floors: dict[str, float]) -> dict[str, tuple[float, float]]:
    """``ranges`` with each floored tensor's low end raised to its floor, as the snapdragon target
    cuts them (targets/tflite_assign.py ``apply_floors``): also the tensors it copies (upstream
    through copying ops read by nothing else), and the addends of the Add that makes it (scores +
    mask): an addend read only by floored Adds starts at ``floor - the other addends' highs``."""
    if not floors:
        return ranges
    out = dict(ranges)
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in set(n.input):
            readers[i] = readers.get(i, 0) + 1
    consts = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                           for o in n.output}

    def cut(t: str | None, floor: float) -> None:
        while t is not None and t in out:
            lo, hi = out[t]
            if floor <= lo or floor >= hi:
                return
            out[t] = (floor, hi)
            node = producer.get(t)
            t = node.input[0] if node is not None and node.op_type in _COPYING else None
            if t is not None and readers.get(t, 0) != 1:
                return  # another node reads the values before the copy: they keep their range

    for t, floor in floors.items():
        cut(t, floor)
    floored_adds: dict[str, float] = {}  # Add node -> the floor of its output
    for t, floor in floors.items():
        node = producer.get(t)
        while node is not None and node.op_type in _COPYING:
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "Add":
            floored_adds[node.name] = min(floored_adds.get(node.name, np.inf), floor)
    wanted: dict[str, float] = {}
    add_nodes = [n for n in model.graph.node if n.name in floored_adds]
    for n in add_nodes:
        ins = [i for i in n.input if i]
        if any(i in consts or i not in out for i in ins):
            continue
        for j in ins:
            others = sum(out[k][1] for k in ins if k != j)
            wanted[j] = min(wanted.get(j, np.inf), floored_adds[n.name] - others)
    adds_reading = {j: sum(j in n.input for n in add_nodes) for j in wanted}
    for j, lo in wanted.items():
        if adds_reading[j] == readers.get(j, 0):  # only floored Adds read it
            cut(j, lo)
    return out
