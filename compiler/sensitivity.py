"""Per-layer, per-precision sensitivity: how far the output moves when only that layer is lowered.

Divergence from the FP32 output, averaged over the sensitivity samples:
- ``kl``: KL(softmax(fp32) || softmax(lowered)) per row, for score-like outputs
  (float [N, C] with C > 1: logits, class scores);
- ``nmse``: ||fp32 - lowered||^2 / ||fp32||^2 per sample (per axis-1 slice for
  outputs of rank >= 3, averaged), for everything else (embeddings, maps, boxes).
A model with outputs of both kinds sums them and reports ``kl+nmse``.

Speed: one emulation session for all cases (``emulate.py``), samples stacked
into batches of up to 4 MiB of inputs when the graph's batch axis allows it, precisions the target
vetoes for a layer never run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from dscompile.compiler.capabilities import FP32, Layer, TargetCapabilities
from dscompile.compiler.emulate import Emulator, build_emulator
from dscompile.compiler.onnx_io import new_session
from dscompile.compiler.verify import looks_like_scores

log = logging.getLogger("dscompile")
Feed = dict[str, np.ndarray]
STACK_BYTES = 4 << 20
POWER_FLOOR = 1e-9  # a slice's power counts at least this share of its output's largest slice (nmse)


@dataclass(frozen=True)
class Sensitivity:
    values: dict[str, dict[str, float]]  # layer -> precision -> divergence (fp32: 0)
    metric: str  # kl | nmse | kl+nmse
    samples: int
    seconds: float
    batched: bool
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)  # layer -> precision -> why


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def kl_rows(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(got)) per row of [N, C] scores."""
    r = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    g = got.reshape(-1, got.shape[-1]).astype(np.float64)
    p = _softmax(r)
    log_p = r - r.max(-1, keepdims=True) - np.log(np.exp(r - r.max(-1, keepdims=True)).sum(-1, keepdims=True))
    log_q = g - g.max(-1, keepdims=True) - np.log(np.exp(g - g.max(-1, keepdims=True)).sum(-1, keepdims=True))
    return np.maximum((p * (log_p - log_q)).sum(-1), 0.0)


def nmse(ref: np.ndarray, got: np.ndarray) -> float:
    """Normalised squared error; for outputs of rank >= 3, the mean over axis-1 slices.

    Per slice because one output often packs quantities of very different scales
    (a detector's box coordinates in pixels beside its class scores in [0, 1]):
    a whole-tensor error would be all boxes and never see the scores collapse.
    A slice's power is floored at ``POWER_FLOOR`` of the largest slice's (RMS 3e-5 of it): the
    score slice of a class absent from the samples (sigmoid outputs ~1e-9) would otherwise turn an
    error nobody can see into the largest divergence of the model (YOLOv8n: 2e7 for one INT8 concat).
    """
    r, g = ref.astype(np.float64), got.astype(np.float64).reshape(ref.shape)
    if r.ndim >= 3 and r.shape[1] > 1:
        r = np.moveaxis(r, 1, 0).reshape(r.shape[1], -1)
        g = np.moveaxis(g, 1, 0).reshape(g.shape[1], -1)
    else:
        r, g = r.reshape(1, -1), g.reshape(1, -1)
    err = ((r - g) ** 2).sum(1)
    power = np.maximum((r**2).sum(1), POWER_FLOOR * float((r**2).sum(1).max()))
    return float(np.mean(np.where(power > 0, err / np.maximum(power, 1e-300), err)))


def output_metric(ref: np.ndarray) -> str:
    return "kl" if looks_like_scores(ref) else "nmse"


def divergence(refs: Sequence[list[np.ndarray]], gots: Sequence[list[np.ndarray]]) -> float:
    """Mean over samples of the summed per-output divergence (``refs[i]``: outputs of sample i)."""
    total = 0.0
    for ref, got in zip(refs, gots, strict=True):
        for r, g in zip(ref, got, strict=True):
            if not np.issubdtype(r.dtype, np.floating):
                continue
            total += float(kl_rows(r, g).mean()) if output_metric(r) == "kl" else nmse(r, g)
    return total / max(len(refs), 1)


def metric_name(refs: Sequence[list[np.ndarray]]) -> str:
    kinds = {output_metric(r) for r in refs[0] if np.issubdtype(r.dtype, np.floating)} if refs else set()
    return "+".join(k for k in ("kl", "nmse") if k in kinds) or "nmse"


class _Runner:
    """Runs the emulator on stacked chunks of the samples when it can, one by one otherwise.

    A chunk holds at most ``STACK_BYTES`` of inputs: the runtime's activation memory grows with the
    batch, so one batch of every sample would grow with the sample count (and with the input size).
    """

    def __init__(self, emu: Emulator, feeds: Sequence[Feed], threads: int | None) -> None:

        from dscompile.compiler.runtime import session_options

        self.emu, self.feeds = emu, list(feeds)
        so = session_options(threads)
        so.log_severity_level = 4  # the batch probe may fail on purpose: keep onnxruntime quiet
        self.session = new_session(emu.model, so)
        self.names = {i.name for i in self.session.get_inputs()}
        self.base = emu.base_feed()
        per_sample = sum(v.nbytes for v in self.feeds[0].values()) if self.feeds else 1
        self.chunk = max(1, min(len(self.feeds), STACK_BYTES // max(per_sample, 1)))
        self.batched = self._stack_ok()

    def _stack_ok(self) -> bool:
        shapes = {tuple((k, v.shape) for k, v in sorted(f.items())) for f in self.feeds}
        if self.chunk < 2 or len(shapes) != 1 or any(v.ndim == 0 or v.shape[0] != 1 for v in self.feeds[0].values()):
            return False
        try:
            got = self._raw({**self.base, **_stacked(self.feeds[: self.chunk])})
            one = self._raw({**self.base, **self.feeds[0]})
        except Exception:
            return False
        return all(g.shape[:1] == (self.chunk,) and np.allclose(g[:1], o, rtol=1e-4, atol=1e-5)
                   for g, o in zip(got, one, strict=True))

    def _raw(self, feed: Feed) -> list[np.ndarray]:
        return self.session.run(None, {k: v for k, v in feed.items() if k in self.names})

    def run(self, override: Feed) -> list[list[np.ndarray]]:
        """Outputs per sample with ``override`` applied to the base feed."""
        feed = {**self.base, **override}
        if not self.batched:
            return [self._raw({**feed, **f}) for f in self.feeds]
        per_sample: list[list[np.ndarray]] = []
        for start in range(0, len(self.feeds), self.chunk):
            part = self.feeds[start : start + self.chunk]
            outs = self._raw({**feed, **_stacked(part)})
            per_sample += [[o[i : i + 1].copy() for o in outs] for i in range(len(part))]
        return per_sample


def _stacked(feeds: Sequence[Feed]) -> Feed:
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


def measure(
    model: onnx.ModelProto, layers: list[Layer], caps: TargetCapabilities, ranges: dict[str, tuple[float, float]],
    feeds: Sequence[Feed], threads: int | None = None, show_progress: bool = True,
    fit_feeds: Sequence[Feed] | None = None,
) -> Sensitivity:
    """Sensitivity of every layer at every precision its menu offers (fp32 counts 0).

    ``fit_feeds``: the calibration samples the build fits GPTQ-rounded weights to (None: the build
    rounds to nearest, e.g. when distillation sets the weights)."""
    start = time.perf_counter()
    cases, skipped = _cases(layers, caps, ranges)
    numerics = {lay.name: [caps.numerics[p] for p in ps] for lay, ps in cases}
    emu = build_emulator(model, layers, numerics, ranges, caps.activations.symmetric,
                         hessians=_gptq_hessians(model, layers, numerics, fit_feeds or (), threads))
    runner = _Runner(emu, feeds, threads)
    refs = runner.run({})
    values: dict[str, dict[str, float]] = {lay.name: {FP32: 0.0} for lay in layers}
    total = sum(len(ps) for _, ps in cases)
    runs = 0
    with _progress(total, show_progress) as advance:
        for p in sorted({p for _, ps in cases for p in ps}):
            members = [lay for lay, ps in cases if p in ps]
            runs += _measure_precision(runner, emu, refs, members, caps.numerics[p], p, values, advance)
    seconds = time.perf_counter() - start
    log.info("sensitivity: %d cases in %d runs on %d samples in %.1f s (%s, %s)", total, runs, len(feeds), seconds,
             metric_name(refs), "batched" if runner.batched else "one sample per run")
    return Sensitivity(values, metric_name(refs), len(feeds), seconds, runner.batched, skipped)


def _gptq_hessians(model: onnx.ModelProto, layers: list[Layer], numerics: dict[str, list], feeds: Sequence[Feed],
                   threads: int | None) -> dict[str, np.ndarray]:
    """Input Hessians of the MatMul/Gemm layers a precision rounds with GPTQ: the sensitivity then
    measures the int4 weights the build writes (the same samples give the build the same Hessians)."""
    from dscompile.compiler.gptq import layer_hessians, matmul_inputs

    if not feeds or not any(n.rounding == "gptq" for ns in numerics.values() for n in ns):
        return {}
    return layer_hessians(model, matmul_inputs(model, [lay.nodes[0] for lay in layers]), feeds, threads)


# Cheap proxy first: layers are measured in groups of GROUP at once; only the groups
# carrying the most divergence (together >= 1 - UNREFINED of it) are measured layer
# by layer, the others share their group's divergence evenly.
GROUP = 6
UNREFINED = 0.02


def _measure_precision(runner: _Runner, emu: Emulator, refs, members: list[Layer], numerics, p: str,
                       values: dict[str, dict[str, float]], advance) -> int:
    """Fill ``values[*][p]`` for ``members``; returns the number of runs it took."""
    def run(group: list[Layer]) -> float:
        feed: Feed = {}
        for lay in group:
            feed.update(emu.case_feed(lay, numerics))
        return divergence(refs, runner.run(feed))

    if len(members) <= 2 * GROUP:
        for lay in members:
            values[lay.name][p] = run([lay])
            advance()
        return len(members)
    groups = [members[i : i + GROUP] for i in range(0, len(members), GROUP)]
    scores = [run(g) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: -scores[i])
    total, left, runs = sum(scores), sum(scores), len(groups)
    for i in order:
        if left <= UNREFINED * total:
            for lay in groups[i]:  # a small share of the divergence: the group's value, split evenly
                values[lay.name][p] = scores[i] / len(groups[i])
                advance()
            continue
        for lay in groups[i]:
            values[lay.name][p] = run([lay])
            advance()
        runs += len(groups[i])
        left -= scores[i]
    return runs


def _cases(layers: list[Layer], caps: TargetCapabilities, ranges: dict) -> tuple[list, dict]:
    cases, skipped = [], {}
    for lay in layers:
        ps = []
        for p in caps.layer_menu(lay):
            if p == FP32:
                continue
            mode = caps.numerics[p].activation
            missing = [t for t in lay.inputs if mode.startswith("static") and t not in ranges]
            if missing:
                skipped.setdefault(lay.name, {})[p] = f"no calibrated range for {missing[0]!r}"
                continue
            ps.append(p)
        if ps:
            cases.append((lay, ps))
    return cases, skipped


class _progress:
    """A rich progress bar on a terminal; nothing otherwise (the summary line is logged)."""

    def __init__(self, total: int, enabled: bool) -> None:
        from dscompile.console import stderr_is_terminal

        self.total, self.bar = total, None
        self.enabled = enabled and stderr_is_terminal() and total > 0

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        from dscompile.console import err

        self.bar = Progress(TextColumn("sensitivity"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            console=err, transient=True)
        self.bar.start()
        task = self.bar.add_task("sensitivity", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
