"""The input shapes calibration saw, kept in the table so targets can size dynamic-shape profiles.

A TensorRT engine is built for one range of shapes per dynamic input (min, opt, max). The
calibration samples are the best evidence of the shapes the model will meet, so calibration
records, per graph input, the smallest, the median and the largest size of every axis over the
samples (axis 0 counted per sample: 1, since rows are a batching detail of the run).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

INPUT_SHAPES = "input_shapes"  # key in CalibrationTable.extra


class InputShapes:
    """Shapes of each input over the calibration samples."""

    def __init__(self) -> None:
        self._seen: dict[str, list[tuple[int, ...]]] = {}

    def add(self, feed: Mapping[str, np.ndarray]) -> None:
        for name, a in feed.items():
            shape = tuple(int(d) for d in a.shape)
            self._seen.setdefault(name, []).append((1, *shape[1:]) if shape else shape)

    def summary(self) -> dict[str, dict[str, list[int]]]:
        """{input: {"min": dims, "opt": dims, "max": dims}}; opt is the per-axis (lower) median."""
        out = {}
        for name, shapes in self._seen.items():
            ranks = {len(s) for s in shapes}
            if len(ranks) != 1:
                continue  # samples of different rank: no single profile describes them
            dims = np.array(shapes, dtype=np.int64)
            opt = np.sort(dims, axis=0)[(len(dims) - 1) // 2] if len(dims) else dims
            out[name] = {"min": dims.min(0).tolist(), "opt": opt.tolist(), "max": dims.max(0).tolist()}
        return out


def seen_shapes(extra: Mapping[str, Any]) -> dict[str, dict[str, tuple[int, ...]]]:
    """The table's recorded shapes as tuples ({} for tables written before shapes were kept)."""
    raw = extra.get(INPUT_SHAPES) or {}
    try:
        return {name: {k: tuple(int(d) for d in v[k]) for k in ("min", "opt", "max")} for name, v in raw.items()}
    except (KeyError, TypeError, ValueError):
        return {}
