"""Ranges for TFLite activations the calibration table cannot give, measured on the float .tflite.

The verified tensor map carries our calibration table's ranges over to every
TFLite tensor that equals an ONNX tensor. onnx2tf also makes tensors that no
ONNX node computes: the pieces of a decomposed LayerNorm (MEAN, SQUARED_DIFFERENCE,
RSQRT...), MULs it inserts, a convolution with an activation folded in. With no
range, ai-edge-quantizer can only leave their ops float, which keeps their weights
float and costs bytes (so does a mapped tensor whose ONNX twin the table did not
calibrate: the table holds layer inputs and outputs, not every glue tensor). So the
float .tflite runs on the calibration samples with every intermediate preserved,
and a running min/max is kept per float activation: two floats per tensor, whatever
the number of samples. These fill only tensors the table leaves without a range:
mapped tensors keep the table's ranges (targets/tflite_assign.py).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from dscompile.calibration.feeds import digest_feed
from dscompile.profiles.litert_runner import IoMap
from dscompile.targets.tflite_flatbuffer import TflGraph, read_graph
from dscompile.targets.tflite_tensor_map import PreservedRun

Range = tuple[float, float]
Feed = dict[str, np.ndarray]
_CACHE: OrderedDict[bytes, dict[str, Range]] = OrderedDict()
_FLOORS: OrderedDict[bytes, dict[str, float]] = OrderedDict()
_CACHE_SIZE = 8
# How far below a row's largest logit a SOFTMAX input still matters: e^-12 = 6e-6, under the
# output grid of an int8 (1/256) and an int16 (1/32768) softmax, even summed over 64 positions.
SOFTMAX_SPAN = 12.0


def measure_ranges(model: bytes, io: IoMap, names: Sequence[str], feeds: Iterable[Feed]) -> dict[str, Range]:
    """Min and max of each TFLite tensor in ``names`` over ``feeds`` (ONNX-named inputs), float model run.

    Tensors the interpreter does not keep, or that hold no finite value, get no range.
    """
    graph = read_graph(model)
    index = {t.name: t.index for t in graph.tensors}
    ids = [index[n] for n in names if n in index]
    lo = np.full(len(ids), np.inf)
    hi = np.full(len(ids), -np.inf)
    if not ids:
        return {}
    for k, v in _preserved_values(model, io, ids, feeds):
        if v.size == 0:
            continue
        a, b = float(v.min()), float(v.max())
        if not (np.isfinite(a) and np.isfinite(b)):  # -inf masks: range the finite values only
            finite = v[np.isfinite(v)]
            if not finite.size:
                continue
            a, b = float(finite.min()), float(finite.max())
        lo[k], hi[k] = min(lo[k], a), max(hi[k], b)
    by_id = {t.index: t.name for t in graph.tensors}
    return {by_id[i]: (float(lo[k]), float(hi[k])) for k, i in enumerate(ids) if lo[k] <= hi[k]}


def float_ranges(model: bytes, io: IoMap, feeds: Sequence[Feed]) -> dict[str, Range]:
    """Min/max of every float activation of ``model`` over ``feeds``, kept per (model, samples):
    DMPQ's repair builds and the final build reuse one run."""
    def measure() -> dict[str, Range]:
        names = [t.name for t in read_graph(model).tensors if t.dtype == "float32" and not t.constant]
        return measure_ranges(model, io, names, feeds)

    return _kept(_CACHE, model, feeds, measure)


def softmax_inputs(graph: TflGraph) -> list[str]:
    """Float tensors read by a SOFTMAX op."""
    t = graph.tensors
    return sorted({t[op.inputs[0]].name for op in graph.ops if op.name == "SOFTMAX" and t[op.inputs[0]].dtype == "float32"})


def measure_floors(model: bytes, io: IoMap, names: Sequence[str], feeds: Iterable[Feed]) -> dict[str, float]:
    """Per SOFTMAX input in ``names``: the smallest row maximum (last axis) over ``feeds``, minus SOFTMAX_SPAN.

    A logit further below its row's maximum than SOFTMAX_SPAN gets a probability no quantized softmax
    can represent, so a static range need not reach below this floor. An additive attention mask
    (-10000, or the float minimum, where a token is padding) puts the tensor's minimum far lower:
    a min/max range then spends the whole int8 grid on the mask, every real score rounds to the same
    code, and the attention turns uniform (all-MiniLM-L6-v2: pooled cosine 0.38).
    """
    graph = read_graph(model)
    index = {t.name: t.index for t in graph.tensors}
    ids = [index[n] for n in names if n in index]
    floor = np.full(len(ids), np.inf)
    if not ids:
        return {}
    for k, v in _preserved_values(model, io, ids, feeds):
        if v.size == 0 or v.ndim == 0:
            continue
        rows = np.max(np.where(np.isfinite(v), v, -np.inf), axis=-1)
        rows = rows[np.isfinite(rows)]
        if rows.size:
            floor[k] = min(floor[k], float(rows.min()))
    by_id = {t.index: t.name for t in graph.tensors}
    return {by_id[i]: float(floor[k]) - SOFTMAX_SPAN for k, i in enumerate(ids) if np.isfinite(floor[k])}


def softmax_floors(model: bytes, io: IoMap, feeds: Sequence[Feed]) -> dict[str, float]:
    """``measure_floors`` of every SOFTMAX input of ``model``, kept per (model, samples) like float_ranges."""
    return _kept(_FLOORS, model, feeds, lambda: measure_floors(model, io, softmax_inputs(read_graph(model)), feeds))


def _kept(cache: OrderedDict, model: bytes, feeds: Sequence[Feed], measure: Callable[[], dict]) -> dict:
    """``measure()``, kept in ``cache`` per (model, samples), the last _CACHE_SIZE of them ({} without samples)."""
    if not feeds:
        return {}
    h = hashlib.sha256(model)
    for f in feeds:
        h.update(digest_feed(f))
    key = h.digest()
    if key not in cache:
        cache[key] = measure()
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def _preserved_values(model: bytes, io: IoMap, ids: Sequence[int], feeds: Iterable[Feed]) -> Iterator[tuple[int, np.ndarray]]:
    """(position in ``ids``, value) of each kept TFLite tensor after each float run of ``model`` over ``feeds``."""
    run = PreservedRun(model)
    for feed in feeds:
        run.run({b.tflite: b.to_tflite(feed[b.onnx]) for b in io.inputs})
        for k, i in enumerate(ids):
            v = run.tensor(i)
            if v is not None:
                yield k, v
