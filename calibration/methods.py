"""Threshold methods: each a pure function of a finished Histogram, returning amax.

- ``entropy``: TensorRT's EntropyCalibration2 / pytorch-quantization KL search
  (see :func:`entropy_amax`), vectorised over all candidates at once.
- ``minmax``: the largest |x| seen.
- ``percentile``: the right edge of the bin where the cumulative share of |x|
  reaches p percent (never above absmax).
- ``mse``: the bin edge minimising the expected squared error of symmetric
  int8 fake quantisation of the histogram's bin centres.

:func:`asymmetric_range` turns a symmetric threshold into the (min, max, scale,
zero point) of a uint8 tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from dscompile.calibration.histograms import Histogram
from dscompile.calibration.kernels import kl_all, mse_errors
from dscompile.calibration.table import METHODS

QUANT_LEVELS = 128  # 8-bit signed: 128 magnitudes + sign
START_BIN = 128
_TIE = 1e-12  # KL values closer than this are ties (float noise of the prefix sums is ~1e-15)


def entropy_amax(h: Histogram, levels: int = QUANT_LEVELS, start: int = START_BIN) -> float:
    """KL-divergence threshold, as TensorRT's EntropyCalibration2 and pytorch-quantization define it.

    The first bin's count is replaced by the second's (exact zeros after a ReLU
    must not dominate). For each candidate i = start..n: P = the first i bins
    with everything beyond added to bin i-1; Q = the first i bins (outliers
    left out) merged into ``levels`` equal-width levels (bin j belongs to level
    floor(j * levels / i)), each level's count spread evenly over its non-empty
    bins. The candidate with the least KL(P || Q) wins, the last one on ties;
    amax is its right edge, i * width (capped at absmax: a grown histogram's
    last edge may lie past the largest value).
    """
    n = len(h.counts)
    if h.width == 0.0 or n < max(start, 2):
        return float(h.absmax)
    b = h.counts.astype(np.float64)
    b[0] = b[1]
    cand = np.arange(start, n + 1)
    kl = kl_all(b, start, levels)
    best = np.flatnonzero(kl <= kl.min() + _TIE)[-1] if np.isfinite(kl).any() else len(cand) - 1
    # the last bin's right edge can pass absmax once the histogram grew: never clip above the data
    return float(min(cand[best] * h.width, h.absmax))


def minmax_amax(h: Histogram) -> float:
    return float(h.absmax)


def percentile_amax(h: Histogram, percentile: float = 99.99) -> float:
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    total = h.counts.sum()
    if h.width == 0.0 or total == 0:
        return float(h.absmax)
    cdf = np.cumsum(h.counts) / total
    idx = int(np.searchsorted(cdf, percentile / 100.0 - 1e-12))
    return float(min((idx + 1) * h.width, h.absmax))


def mse_amax(h: Histogram, start: int = START_BIN, stride: int = 8) -> float:
    """Edge i * width (i >= start) minimising sum(count * (fake_quant(centre) - centre)^2).

    Searched on every ``stride``-th edge, then refined edge by edge around the best.
    """
    n = len(h.counts)
    if h.width == 0.0 or n <= start:
        return float(h.absmax)
    counts = h.counts.astype(np.float64)
    centres = (np.arange(n) + 0.5) * h.width
    used = counts > 0
    counts, centres = counts[used], centres[used]

    def errors(edges: np.ndarray) -> np.ndarray:
        return mse_errors(counts, centres, edges * h.width)

    coarse = np.arange(start, n + 1, stride)
    best = int(coarse[np.argmin(errors(coarse))])
    fine = np.arange(max(start, best - stride + 1), min(n, best + stride - 1) + 1)
    return float(fine[np.argmin(errors(fine))] * h.width)


def compute(h: Histogram, method: str, percentile: float = 99.99) -> float:
    fn: dict[str, Callable[[Histogram], float]] = {
        "entropy": entropy_amax,
        "minmax": minmax_amax,
        "percentile": lambda x: percentile_amax(x, percentile),
        "mse": mse_amax,
    }
    if method not in fn:
        raise ValueError(f"unknown calibration method {method!r} (known: {', '.join(METHODS)})")
    return fn[method](h)


def asymmetric_range(lo: float, hi: float, amax: float | None = None, qmax: int = 255) -> tuple[float, float, float, int]:
    """(min, max, scale, zero_point) for an unsigned 8-bit tensor.

    The observed [lo, hi] is clipped to [-amax, amax] when a symmetric threshold
    is given (so an entropy or percentile clip carries over), then widened to
    hold 0 exactly, as every integer runtime requires.
    """
    if amax is not None:
        lo, hi = max(lo, -amax), min(hi, amax)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi == lo:
        return lo, hi, 1.0, 0
    scale = (hi - lo) / qmax
    zero_point = int(min(max(round(-lo / scale), 0), qmax))
    return lo, hi, scale, zero_point


def values_needed(method: str, percentile: float = 99.99, num_bins: int = 2048) -> int:
    """How many values a tensor needs before the method means more than its max."""
    if method == "percentile":
        return math.ceil(100.0 / (100.0 - percentile)) if percentile < 100.0 else 1
    if method in ("entropy", "mse"):
        return num_bins
    return 1
