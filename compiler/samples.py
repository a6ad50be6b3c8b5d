"""Seeded synthetic inputs for checks when the user gave no data."""

from __future__ import annotations

import numpy as np
import onnx

from dscompile.compiler.graph import TensorSpec

Feed = dict[str, np.ndarray]

# A dynamic axis with no user shape: batch axes get 1, others a short length.
_DYNAMIC_BATCH = 1
_DYNAMIC_OTHER = 8


def concrete_shape(spec: TensorSpec) -> tuple[int, ...]:
    return tuple(
        d if isinstance(d, int) and d > 0 else (_DYNAMIC_BATCH if i == 0 else _DYNAMIC_OTHER)
        for i, d in enumerate(spec.shape)
    )


def index_limits(model: onnx.ModelProto | None) -> dict[str, int]:
    """Inputs used as Gather indices into an initializer table, with the table's size."""
    if model is None:
        return {}
    tables = {t.name: t.dims[0] for t in model.graph.initializer if t.dims}
    limits: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) == 2 and n.input[0] in tables:
            limits[n.input[1]] = int(tables[n.input[0]])
    return limits


def synthetic_feeds(
    specs: tuple[TensorSpec, ...], count: int, seed: int = 0, model: onnx.ModelProto | None = None
) -> list[Feed]:
    rng = np.random.default_rng(seed)
    limits = index_limits(model)
    feeds = []
    for _ in range(count):
        feed: Feed = {}
        for s in specs:
            shape = concrete_shape(s)
            if s.dtype.startswith("float"):
                feed[s.name] = rng.standard_normal(shape).astype(s.dtype)
            elif s.dtype == "bool":
                feed[s.name] = rng.integers(0, 2, shape).astype(bool)
            else:
                high = limits.get(s.name, 2)
                feed[s.name] = rng.integers(0, high, shape).astype(s.dtype)
        feeds.append(feed)
    return feeds
