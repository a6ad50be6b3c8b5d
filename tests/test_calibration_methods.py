"""Histograms and threshold methods, against independent references written from their descriptions."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from dscompile.calibration.histograms import Histogram, StreamingHistogram
from dscompile.calibration.methods import (
    asymmetric_range,
    entropy_amax,
    minmax_amax,
    mse_amax,
    percentile_amax,
)
from dscompile.calibration.table import (
    CalibrationTable,
    TensorRange,
    read_trt_cache,
    write_trt_cache,
)


def reference_entropy(counts: np.ndarray, width: float, levels: int = 128, start: int = 128) -> float:
    """TensorRT EntropyCalibration2 / pytorch-quantization, written bin by bin from the published steps.

    1. the first bin's count is replaced by the second's;
    2. for i = 128 .. n: P = first i bins, with the counts of all bins beyond added to bin i-1;
    3. Q = the first i bins without outliers, merged into 128 levels (bin j -> level j*128//i),
       each level's total spread evenly over its non-empty bins (empty bins stay 0);
    4. KL(P||Q) on the normalised P and Q (inf where P > 0 and Q == 0);
    5. the i with least KL, the last on ties; amax = right edge of bin i-1 = i * width.
    """
    from scipy.stats import entropy

    bins = np.array(counts, dtype=np.float64)
    bins[0] = bins[1]
    n = len(bins)
    results = []
    for i in range(start, n + 1):
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        level = np.arange(i) * levels // i
        level_total = np.bincount(level, weights=bins[:i], minlength=levels)
        level_nonempty = np.bincount(level, weights=(bins[:i] > 0).astype(float), minlength=levels)
        q = np.where(bins[:i] > 0, level_total[level] / np.maximum(level_nonempty[level], 1), 0.0)
        results.append((float(entropy(p, q)), i))  # scipy normalises both, inf where p > 0 == q
    best = min(kl for kl, _ in results)
    chosen = [i for kl, i in results if kl <= best + 1e-12][-1]
    return chosen * width


def _streamed(x: np.ndarray, parts: int = 5, bins: int = 2048) -> Histogram:
    s = StreamingHistogram(bins)
    for part in np.array_split(x.astype(np.float32), parts):
        s.update(part)
    return s.finish()


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "gaussian": rng.standard_normal(40_000),
        "relu": np.maximum(rng.standard_normal(40_000), 0),  # half exact zeros
        "laplace-heavy-tail": rng.laplace(size=30_000),
        "outlier": np.concatenate([rng.standard_normal(30_000), [60.0]]),
        "growing-range": np.concatenate([rng.uniform(0, 0.5, 5000), rng.standard_normal(20_000) * 3]),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_entropy_matches_reference(name):
    h = _streamed(_cases()[name])
    want = min(reference_entropy(h.counts, h.width), h.absmax)
    assert entropy_amax(h) == pytest.approx(want, rel=1e-12)


def test_entropy_on_a_full_2048_bin_histogram_is_the_published_search():
    rng = np.random.default_rng(1)
    counts = np.bincount(np.minimum((np.abs(rng.standard_t(3, 200_000)) * 200).astype(int), 2047), minlength=2048)
    h = Histogram(counts.astype(np.int64), 0.005, 0.0, 2048 * 0.005, 2048 * 0.005, int(counts.sum()))
    assert entropy_amax(h) == pytest.approx(reference_entropy(counts, 0.005), rel=1e-12)


def test_streaming_histogram_is_exact_after_growth():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.uniform(-1, 1, 3000), rng.uniform(-3, 3, 3000), rng.uniform(-50, 50, 3000)]).astype(np.float32)
    h = _streamed(x, parts=3)
    assert h.counts.sum() == x.size
    assert 2048 <= len(h.counts) <= 4096
    assert h.range[1] >= np.abs(x).max()
    idx = np.minimum((np.abs(x) / np.float32(h.width)).astype(np.int64), len(h.counts) - 1)
    # one-shot binning with the final edges gives the same counts (re-binning lost nothing)
    diff = np.abs(np.bincount(idx, minlength=len(h.counts)) - h.counts).sum()
    assert diff <= 2 * 3  # at most a value at each merged edge moves by float32 rounding


def test_histogram_memory_is_bounded_whatever_the_range():
    s = StreamingHistogram(2048)
    for scale in (1e-3, 1e-1, 1e1, 1e3, 1e6):
        s.update(np.linspace(-scale, scale, 1001, dtype=np.float32))
        assert len(s.counts) <= 4096
    h = s.finish()
    assert h.counts.sum() == 5 * 1001 and h.absmax == pytest.approx(1e6)


def test_update_kernel_is_the_plain_binning_block_by_block():
    """The vectorised kernel against numpy, over several blocks, one of them holding NaN/Inf."""
    from dscompile.calibration.kernels import scratch, update_abs

    rng = np.random.default_rng(4)
    x = (rng.standard_normal(3 * 4096 + 77) * 3).astype(np.float32)
    x[5000:5003] = [np.nan, np.inf, -np.inf]
    x[9000] = -np.float32(np.nan)  # a negative NaN: sign bit set
    assert x.view(np.int32)[9000] < 0
    counts = np.zeros(300, np.int64)
    inv = np.float32(300 / 5.0)  # values past 5.0 overflow
    lo, hi, overflow, nonfinite = update_abs(x, x.view(np.int32), counts, float(inv), scratch(300, x.size))
    finite = x[np.isfinite(x)]
    j = (np.abs(finite) * inv).astype(np.int64)  # float32 product, as the kernel computes it
    assert (counts == np.bincount(j[j < 300], minlength=300)).all()
    assert (overflow, nonfinite) == (int((j >= 300).sum()), 4)
    assert (lo, hi) == (float(finite.min()), float(finite.max()))


@pytest.mark.parametrize("bins", [2048, 4096, 70_000])  # 16-bit bin indices, and 32-bit past 65,534 bins
def test_update_kernel_matches_numpy_on_edge_values(bins):
    """Counts, overflow, min and max against a plain numpy reference: bin edges, the last bin, values
    past it (also past any integer bin index), signed zeros, subnormals, one-signed blocks."""
    from dscompile.calibration.kernels import scratch, update_abs

    rng = np.random.default_rng(bins)
    inv = np.float32(bins / 8.0)
    edges = (np.arange(0, bins + 3, 7, dtype=np.float32) / inv).astype(np.float32)
    parts = [
        rng.standard_normal(5 * 4096).astype(np.float32) * 3,
        edges, -edges, np.nextafter(edges, np.float32(0)), np.nextafter(edges, np.float32(np.inf)),
        np.array([0.0, -0.0, 1e-45, -1e-45, 8.0, -8.0, 7.9999995, 1e30, -3e38], np.float32),
        np.abs(rng.standard_normal(4096).astype(np.float32)),  # a block with no negative value
        -np.abs(rng.standard_normal(4096).astype(np.float32)),  # and one with no positive value
    ]
    x = np.concatenate(parts)
    idx = scratch(bins, x.size)
    assert idx.dtype == (np.uint16 if bins < 65535 else np.uint32)
    counts = np.zeros(bins, np.int64)
    lo, hi, overflow, nonfinite = update_abs(x, x.view(np.int32), counts, float(inv), idx)
    with np.errstate(over="ignore"):
        t = np.abs(x) * inv  # float32, as the kernel computes it (-3e38 * inv is inf)
    j = np.where(t < np.float32(bins), t, bins).astype(np.int64)
    assert (counts == np.bincount(j[j < bins], minlength=bins)).all()
    assert (overflow, nonfinite) == (int((j >= bins).sum()), 0)
    assert (lo, hi) == (float(x.min()), float(x.max()))
    c = np.zeros(8, np.int64)  # a width so small that 1 / width is inf in float32: 0 * inf is NaN, counted as overflow
    tiny = np.array([0.0, 1e-40, -0.0], np.float32)
    assert update_abs(tiny, tiny.view(np.int32), c, 1e48, scratch(8, 3))[2:] == (3, 0) and c.sum() == 0
    for block in (parts[-2], parts[-1], np.zeros(10, np.float32), -np.zeros(10, np.float32)):
        c = np.zeros(bins, np.int64)
        got = update_abs(block, block.view(np.int32), c, float(inv), scratch(bins, block.size))
        assert got[:2] == (float(block.min()) + 0.0, float(block.max()) + 0.0)  # -0.0 reported as 0.0
        assert c.sum() == block.size


def test_runs_are_cut_to_the_activation_budget():
    from dscompile.calibration.collect import _Splitter

    split = _Splitter(budget=1000, dynamic=True)
    feed = {"x": np.arange(40, dtype=np.float32).reshape(20, 2)}
    rows = []
    for part in split([feed]):  # the first run is one row; then 1000 B / (10 B per input value * 2) = 50 rows
        rows.append(len(part["x"]))
        split.observe(part, [np.zeros(len(part["x"]) * 5, np.float32)])  # 20 B of activations per row
    assert rows == [1, 19]
    assert np.array_equal(np.concatenate([p["x"] for p in _Splitter(40, True)([feed])]), feed["x"])
    split = _Splitter(budget=40, dynamic=True)
    split.observe(feed, [np.zeros(200, np.float32)])  # 800 B for 20 rows: 40 B per row
    assert [len(p["x"]) for p in split([feed])] == [1] * 20
    assert [len(p["x"]) for p in _Splitter(40, dynamic=False)([feed])] == [20]


def test_zeros_and_non_finite_values():
    s = StreamingHistogram()
    s.update(np.zeros(10, np.float32))
    assert s.finish().width == 0.0 and entropy_amax(s.finish()) == 0.0
    s.update(np.array([1.0, -2.0, np.inf, np.nan], np.float32))
    h = s.finish()
    assert (h.min, h.max, h.absmax) == (-2.0, 1.0, 2.0)
    assert h.counts.sum() == 12 and h.counts[0] == 10 and s.nonfinite == 2


def test_percentile_minmax_mse():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(100_000), [25.0]])
    h = _streamed(x)
    assert minmax_amax(h) == pytest.approx(25.0)
    p = percentile_amax(h, 99.0)
    assert p == pytest.approx(np.percentile(np.abs(x), 99.0), abs=2 * h.width)
    assert percentile_amax(h, 100.0) == pytest.approx(25.0)
    # the expected-error optimum, brute force over every edge from bin 128 on
    centres = (np.arange(len(h.counts)) + 0.5) * h.width
    edges = np.arange(128, len(h.counts) + 1) * h.width
    errs = [np.sum(h.counts * (np.minimum(np.rint(centres / (a / 127)), 127) * (a / 127) - centres) ** 2) for a in edges]
    assert mse_amax(h) == pytest.approx(edges[int(np.argmin(errs))], abs=2 * h.width)
    assert mse_amax(h) < 20.0  # the lone outlier is clipped
    uniform = _streamed(rng.uniform(-1, 1, 50_000))
    assert mse_amax(uniform) == pytest.approx(1.0, abs=0.02)  # nothing to clip on a uniform


def test_asymmetric_range_for_uint8():
    lo, hi, scale, zp = asymmetric_range(0.0, 6.0)
    assert (lo, hi, zp) == (0.0, 6.0, 0) and scale == pytest.approx(6.0 / 255)
    lo, hi, scale, zp = asymmetric_range(-1.0, 3.0, amax=2.0)  # clipped by a threshold
    assert (lo, hi) == (-1.0, 2.0) and zp == round(1.0 / scale)
    lo, hi, _, zp = asymmetric_range(2.0, 5.0)  # always holds zero
    assert lo == 0.0 and zp == 0


def _table() -> CalibrationTable:
    tensors = {
        "input": TensorRange(-1.0, 1.0, 1.0, {"entropy": 0.9, "minmax": 1.0}),
        "conv_out/relu:0": TensorRange(0.0, 7.5, 7.5, {"entropy": 5.25, "minmax": 7.5}),
    }
    return CalibrationTable("m" * 64, "d" * 64, 10, tensors)


@pytest.mark.parametrize(("method", "algo"), [("entropy", "EntropyCalibration2"), ("minmax", "MinMaxCalibration")])
def test_trt_cache_round_trip(tmp_path, method, algo):
    table = _table()
    path = write_trt_cache(table, tmp_path / "calib.cache", method)
    header, scales = read_trt_cache(path)
    assert header.startswith("TRT-") and header.endswith(f"-{algo}")
    assert set(scales) == set(table.tensors)
    for name, tr in table.tensors.items():
        assert scales[name] == struct.unpack(">f", struct.pack(">f", tr.amax[method] / 127.0))[0]
    line = path.read_text().splitlines()[1]
    assert len(line.rsplit(": ", 1)[1]) == 8  # 8 hex digits, big-endian float32


def test_table_json_round_trip(tmp_path):
    table = _table()
    again = CalibrationTable.load(table.save(tmp_path / "calib.json"))
    assert again.to_json() == table.to_json()
    assert again.range("conv_out/relu:0").asymmetric("entropy")[1] == 5.25
