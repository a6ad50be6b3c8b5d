"""Streaming statistics of one tensor: min, max, absmax and a histogram of |x|, in bounded memory.

The histogram follows NVIDIA Model Optimizer's ``HistogramCalibrator`` (and
pytorch-quantization before it): the first batch fixes the bin width as
absmax / num_bins over [0, absmax]; a later, larger value appends bins of the
same width, so earlier counts stay exact. Model Optimizer lets the bin count
grow without limit; here it may grow to ``2 * num_bins``, and past that
adjacent pairs of bins are merged (the width doubles, still exact) until the
range fits again. Memory per tensor is therefore at most 2 * num_bins counts,
whatever the number of samples, and the histogram over [0, absmax] always has
between num_bins and 2 * num_bins bins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dscompile.calibration.kernels import add_abs, add_overflow, scratch, update_abs

DEFAULT_BINS = 2048


@dataclass(frozen=True)
class Histogram:
    """A finished histogram of |x|: ``counts[j]`` values fell in [j * width, (j + 1) * width).

    ``width`` is 0 when every value was zero (then ``counts`` is one bin of zeros).
    """

    counts: np.ndarray  # int64
    width: float
    min: float
    max: float
    absmax: float
    values: int  # how many values were observed

    @property
    def edges(self) -> np.ndarray:
        return np.arange(len(self.counts) + 1, dtype=np.float64) * self.width

    @property
    def range(self) -> tuple[float, float]:
        return 0.0, len(self.counts) * self.width

    def to_json(self) -> dict[str, object]:
        return {"bins": [int(c) for c in self.counts], "range": [0.0, float(len(self.counts) * self.width)]}

    @classmethod
    def from_json(cls, data: dict, lo: float, hi: float, absmax: float) -> Histogram:
        counts = np.asarray(data["bins"], dtype=np.int64)
        top = float(data["range"][1])
        width = top / len(counts) if len(counts) else 0.0
        return cls(counts, width, lo, hi, absmax, int(counts.sum()))


class StreamingHistogram:
    """Accumulates min/max/absmax and the |x| histogram of one tensor, batch by batch."""

    def __init__(self, num_bins: int = DEFAULT_BINS) -> None:
        if num_bins < 2:
            raise ValueError("a histogram needs at least 2 bins")
        self.num_bins = num_bins
        self.max_bins = 2 * num_bins
        self.width = 0.0  # 0 until a non-zero value arrives
        self.counts = np.zeros(0, dtype=np.int64)
        self.zeros = 0  # values seen while every value so far was zero
        self.min = math.inf
        self.max = -math.inf
        self.absmax = 0.0
        self.values = 0
        self.nonfinite = 0

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        if self.width == 0.0:
            self._first(flat)
            return
        n, inv = len(self.counts), 1.0 / self.width
        idx = scratch(n, flat.size)
        lo, hi, overflow, nonfinite = update_abs(flat, flat.view(np.int32), self.counts, inv, idx)  # the steady state: one pass
        self._account(flat.size - nonfinite, nonfinite, lo, hi)
        if overflow:  # larger values than the range holds: grow (exactly), then bin just those
            self._grow(max(abs(lo), abs(hi)))
            add_overflow(flat, self.counts, inv, n, 1.0 / self.width)

    def _first(self, flat: np.ndarray) -> None:
        """Until a non-zero value arrives there is no bin width: take min/max first."""
        finite = flat if np.isfinite(flat).all() else flat[np.isfinite(flat)]
        self._account(finite.size, flat.size - finite.size, *((float(finite.min()), float(finite.max()))
                                                               if finite.size else (math.inf, -math.inf)))
        top = self.absmax
        if finite.size == 0:
            return
        if top == 0.0:
            self.zeros += finite.size
            return
        self._start(top)
        add_abs(finite, self.counts, 1.0 / self.width)

    def _account(self, values: int, nonfinite: int, lo: float, hi: float) -> None:
        self.values += values
        self.nonfinite += nonfinite
        if values:
            self.min, self.max = min(self.min, lo), max(self.max, hi)
            self.absmax = max(self.absmax, abs(self.min), abs(self.max))

    def _start(self, top: float) -> None:
        self.width = top / self.num_bins
        self.counts = np.zeros(self.num_bins, dtype=np.int64)
        self.counts[0] = self.zeros
        self.zeros = 0

    def _grow(self, top: float) -> None:
        needed = math.ceil(top / self.width)
        if needed <= len(self.counts):
            return
        factor = 1
        while math.ceil(top / (self.width * factor)) > self.max_bins:
            factor *= 2
        if factor > 1:  # merge groups of `factor` adjacent bins: exact, the edges line up
            pad = (-len(self.counts)) % factor
            merged = np.concatenate([self.counts, np.zeros(pad, np.int64)]).reshape(-1, factor).sum(1)
            self.counts, self.width = merged, self.width * factor
            needed = math.ceil(top / self.width)
        if needed > len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros(needed - len(self.counts), np.int64)])

    def finish(self) -> Histogram:
        if self.width == 0.0:
            return Histogram(np.array([self.zeros], np.int64), 0.0, _finite(self.min), _finite(self.max), 0.0, self.values)
        return Histogram(self.counts.copy(), self.width, self.min, self.max, self.absmax, self.values)

    @property
    def nbytes(self) -> int:
        return self.counts.nbytes


def _finite(v: float) -> float:
    return v if math.isfinite(v) else 0.0
