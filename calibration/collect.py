"""Run the model on calibration data and collect streaming statistics of the tensors a quantiser may touch.

The tensors to observe are added as graph outputs of a copy of the model, which
onnxruntime runs batch by batch; each batch's activations update one
StreamingHistogram per tensor and are dropped, so memory does not grow with the
number of samples.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import onnx

from dscompile.calibration.feeds import Feed, rows_of
from dscompile.calibration.histograms import DEFAULT_BINS, StreamingHistogram
from dscompile.calibration.methods import METHODS, QUANT_LEVELS, compute, values_needed
from dscompile.calibration.progress import Progress
from dscompile.calibration.shapes import INPUT_SHAPES, InputShapes
from dscompile.calibration.table import CalibrationTable, TensorRange
from dscompile.errors import InputError

log = logging.getLogger("dscompile")

# op type -> which inputs are activations a quantiser would quantise (None: all non-constant inputs)
_INPUTS: dict[str, tuple[int, ...] | None] = {
    "Conv": (0,), "ConvTranspose": (0,), "MatMul": None, "Gemm": None, "Einsum": None,
    "Attention": (0,), "MultiHeadAttention": (0, 1, 2), "GroupQueryAttention": (0, 1, 2),
    "MaxPool": (0,), "AveragePool": (0,), "GlobalAveragePool": (0,), "GlobalMaxPool": (0,),
}
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
# Bytes of observed activations per run (two runs' worth are alive). Small on purpose: onnxruntime
# spends the same CPU per row at 1 row as at 32 on the CNNs measured, and a large cap let runs of a
# varied-shape stream grow fuller as the sample count grew (PP-OCR: peak RSS 1.2x from 100 to 1000).
_ACTIVATION_BUDGET = 32 << 20
_TWO_SESSIONS_MAX_WEIGHTS = 512 << 20


def quantizable_tensors(model: onnx.ModelProto) -> list[str]:
    """Float graph inputs, activations feeding Conv/ConvTranspose/MatMul/Gemm/attention/pooling
    and residual Adds (both operands computed), and the outputs of those nodes; in graph order."""
    g = model.graph
    const = {t.name for t in g.initializer}
    for n in g.node:  # propagate: a node fed only by constants (shape arithmetic) is constant too
        if n.op_type == "Constant" or (n.input and all(i in const or not i for i in n.input)):
            const.update(o for o in n.output if o)
    types = _elem_types(model)

    def is_float(name: str) -> bool:
        return types.get(name, onnx.TensorProto.FLOAT) in _FLOATS

    chosen: dict[str, None] = {}
    for vi in g.input:
        if vi.name not in const and is_float(vi.name):
            chosen[vi.name] = None
    for n in g.node:
        if n.op_type in _INPUTS:
            picks = _INPUTS[n.op_type]
            idx = range(len(n.input)) if picks is None else picks
            acts = [n.input[i] for i in idx if i < len(n.input) and n.input[i] and n.input[i] not in const]
        elif n.op_type == "Add" and len(n.input) == 2 and not (set(n.input) & const):
            acts = list(n.input)  # a residual add: two computed operands
        else:
            continue
        outs = [n.output[0]] if n.output and n.output[0] else []
        for name in [*acts, *outs]:
            if is_float(name):
                chosen[name] = None
    return list(chosen)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is advisory; unknown types are checked at run time
        inferred = model
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return {k: v for k, v in types.items() if v}


def calibrate(
    model: onnx.ModelProto,
    feeds: Iterable[dict[str, np.ndarray]],
    *,
    model_sha256: str,
    data_sha256: str,
    tensors: Sequence[str] | None = None,
    methods: Sequence[str] = METHODS,
    percentile: float = 99.99,
    num_bins: int = DEFAULT_BINS,
    progress: bool = True,
) -> CalibrationTable:
    """Statistics and thresholds of ``tensors`` (default: quantizable_tensors) over ``feeds``."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown calibration method {', '.join(unknown)} (known: {', '.join(METHODS)})")
    if not 0.0 < percentile <= 100.0:
        raise InputError(f"--percentile {percentile}: must be in (0, 100]")
    names = list(dict.fromkeys(tensors if tensors is not None else quantizable_tensors(model)))
    graph_inputs = {vi.name for vi in model.graph.input}
    _check_names(model, names)
    outputs = [n for n in names if n not in graph_inputs]
    aug = _with_outputs(model, outputs)
    workers = _workers(aug)
    sessions = [_session(aug, max(1, _cores() // workers)) for _ in range(workers)]
    stats = {n: StreamingHistogram(num_bins) for n in names}
    total = getattr(feeds, "count", None) or (sum(map(rows_of, feeds)) if isinstance(feeds, (list, tuple)) else None)
    start = time.perf_counter()
    shapes = InputShapes()
    observe = _Observe(stats, outputs, [n for n in names if n in graph_inputs])
    split = _Splitter(_ACTIVATION_BUDGET, _dynamic_batch(model))
    with Progress("calibrating", total, enabled=progress) as bar:
        rows = _stream(split(feeds), split, sessions, observe, shapes, bar)
    if rows == 0:
        raise InputError("the calibration data holds no samples")
    seconds = time.perf_counter() - start
    log.info(f"calibrated {len(names)} tensors on {rows} samples in {seconds:.1f} s ({rows / seconds:.1f} samples/s)")
    table = _table(stats, methods, percentile, num_bins, model_sha256, data_sha256, rows)
    table.extra[INPUT_SHAPES] = shapes.summary()
    _warn_thin(stats, methods, percentile, num_bins, rows)
    return table


def _stream(batches: Iterator[Feed], split: _Splitter, sessions: list, observe: _Observe, shapes: InputShapes,
            bar: Progress) -> int:
    """Run and observe every batch, one worker per session; returns the number of rows.

    Each worker runs its batch through its own single-threaded session, then bins the results
    (onnxruntime and the compiled kernels both release the GIL). On 2 cores, two such workers
    kept both busy where one session on both cores plus a histogram thread left one idle while
    the other binned. Batch k+len(sessions) is cut only after batch k is done, so the cuts, like
    the histograms (updated per tensor in batch order), do not depend on thread timing.
    """
    rows, inflight = 0, deque()
    with ThreadPoolExecutor(len(sessions), thread_name_prefix="calib") as pool:
        try:
            for k in itertools.count():
                if len(inflight) == len(sessions):
                    rows += _settle(inflight.popleft(), split, shapes, bar)
                feed = next(batches, None)
                if feed is None:
                    break
                inflight.append((feed, pool.submit(observe, k, sessions[k % len(sessions)], feed)))
            while inflight:
                rows += _settle(inflight.popleft(), split, shapes, bar)
        except BaseException:
            observe.abort()
            raise
    return rows


def _settle(item: tuple[Feed, Future], split: _Splitter, shapes: InputShapes, bar: Progress) -> int:
    feed, future = item
    split.observe_bytes(feed, future.result())
    shapes.add(feed)
    n = rows_of(feed)
    bar.advance(n)
    return n


class _Observe:
    """Runs batch k and folds its tensors into the histograms, each tensor after batch k-1's update
    of it (the order a serial loop would have), so the results do not depend on thread timing."""

    def __init__(self, stats: dict[str, StreamingHistogram], outputs: Sequence[str], inputs: Sequence[str]) -> None:
        self.stats, self.outputs, self.inputs = stats, list(outputs), list(inputs)
        self.done = dict.fromkeys(stats, -1)  # tensor -> last batch folded in
        self.cond = threading.Condition()
        self.aborted = False

    def __call__(self, k: int, session, feed: Feed) -> int:
        arrays = _run(session, self.outputs, feed)
        observed = [*zip(self.outputs, arrays, strict=True), *((n, feed[n]) for n in self.inputs)]
        for name, a in observed:
            with self.cond:
                self.cond.wait_for(lambda name=name: self.done[name] == k - 1 or self.aborted)
                if self.aborted:
                    raise InputError("calibration stopped")  # another batch failed; its error is the one reported
            if a.dtype.kind == "f":
                self.stats[name].update(a)
            with self.cond:
                self.done[name] = k
                self.cond.notify_all()
        return sum(a.nbytes for a in arrays)

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            self.cond.notify_all()


def _check_names(model: onnx.ModelProto, names: Sequence[str]) -> None:
    known = {vi.name for vi in model.graph.input} | {o for n in model.graph.node for o in n.output}
    missing = [n for n in names if n not in known]
    if missing:
        raise InputError(f"the model has no tensor named {', '.join(missing[:5])}")


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    present = {o.name for o in aug.graph.output}
    aug.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    return aug


def _workers(model: onnx.ModelProto) -> int:
    """Two single-threaded workers on a machine with 2+ cores, unless the model is big enough that a
    second copy of its weights costs more memory than the parallelism is worth."""
    weights = sum(len(t.raw_data) or 4 * int(np.prod(t.dims)) for t in model.graph.initializer)
    return 2 if _cores() >= 2 and weights <= _TWO_SESSIONS_MAX_WEIGHTS else 1


def _session(model: onnx.ModelProto, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # its errors reach the user as our one line, not also as its own log line
    # onnxruntime's pool threads spin between parallel sections by default; those cycles are the ones
    # the histogram thread runs in, so spinning only trades our work for busy-waiting
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InputError(f"onnxruntime cannot load the model: {str(exc).strip().splitlines()[0][:300]}") from None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _run(session, outputs: Sequence[str], feed: Feed) -> list[np.ndarray]:
    try:
        return session.run(list(outputs), feed) if outputs else []
    except Exception as exc:
        shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in feed.items())
        text = str(exc).strip().splitlines()[0][:300]
        raise InputError(f"onnxruntime failed on calibration inputs ({shapes}): {text}") from None


def _dynamic_batch(model: onnx.ModelProto) -> bool:
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            return False
    return True


class _Splitter:
    """Cuts batches (dynamic batch only) so one run's observed activations stay within ``budget`` bytes.

    The bytes of activations per input element are learnt from the runs themselves (the largest
    ratio seen), so inputs of another shape (longer sequences, wider images) get fewer rows per run.
    Until a run has been seen, a batch starts with a single row.
    """

    def __init__(self, budget: int, dynamic: bool) -> None:
        self.budget, self.dynamic = budget, dynamic
        self.per_item: float | None = None  # activation bytes per input element

    def observe(self, feed: Feed, arrays: Sequence[np.ndarray]) -> None:
        self.observe_bytes(feed, sum(a.nbytes for a in arrays))

    def observe_bytes(self, feed: Feed, nbytes: int) -> None:
        items = sum(v.size for v in feed.values()) or 1
        self.per_item = max(self.per_item or 0.0, nbytes / items)

    def __call__(self, feeds: Iterable[Feed]) -> Iterator[Feed]:
        for feed in feeds:
            n = rows_of(feed)
            if not self.dynamic or n <= 1:
                yield feed
                continue
            start = 0
            while start < n:  # the generator resumes after observe(): each cut uses what was learnt
                step = self._rows(feed, n)
                yield feed if start == 0 and step >= n else {k: v[start:start + step] for k, v in feed.items()}
                start += step

    def _rows(self, feed: Feed, n: int) -> int:
        if self.per_item is None:
            return 1
        row_items = sum(v.size for v in feed.values()) / n
        return max(1, int(self.budget // (self.per_item * row_items or 1)))


def _table(stats: dict[str, StreamingHistogram], methods: Sequence[str], percentile: float, num_bins: int,
           model_sha256: str, data_sha256: str, rows: int) -> CalibrationTable:
    def one(s: StreamingHistogram) -> TensorRange:
        h = s.finish()
        amax = {m: compute(h, m, percentile) for m in methods}
        return TensorRange(h.min, h.max, h.absmax, amax, h.to_json())

    # the searches run in compiled code that releases the GIL: tensors side by side, results in name order
    with ThreadPoolExecutor(max(1, min(_cores(), len(stats))), thread_name_prefix="calib-table") as pool:
        tensors = dict(zip(stats, pool.map(one, stats.values()), strict=True))
    return CalibrationTable(model_sha256, data_sha256, rows, tensors, {"settings": settings(methods, percentile, num_bins)})


def settings(methods: Sequence[str], percentile: float, num_bins: int) -> dict[str, object]:
    """What, besides model and data, decides a table: a rerun with other settings recomputes."""
    return {"methods": list(methods), "percentile": percentile, "num_bins": num_bins,
            "num_quantized_bins": QUANT_LEVELS, "histogram": "abs"}


def _warn_thin(stats: dict[str, StreamingHistogram], methods: Sequence[str], percentile: float,
               num_bins: int, rows: int) -> None:
    """Say when there were fewer values than a method needs, and what that does to its thresholds."""
    effect = {
        "percentile": "their percentile threshold is their max",
        "entropy": "the KL search runs on a sparse histogram and its thresholds are noisy",
        "mse": "the MSE search runs on a sparse histogram and its thresholds are noisy",
    }
    for m in methods:
        need = values_needed(m, percentile, num_bins)
        thin = [n for n, s in stats.items() if s.values < need]
        if thin and m in effect:
            log.warning(
                f"{m}: {len(thin)} of {len(stats)} tensors saw fewer than {need} values over {rows} samples "
                f"(e.g. {thin[0]}: {stats[thin[0]].values}); {effect[m]}; calibrate on more samples"
            )
