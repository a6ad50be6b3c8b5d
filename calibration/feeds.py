"""Model input specs, checking a feed against them, and forming batches where shapes agree.

Input specs come from the caller as any objects with ``.name``, ``.shape`` and
``.dtype`` (the compiler's TensorSpec) or as plain dicts: calibration imports
nothing of the compiler.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dscompile.errors import InputError

Feed = dict[str, np.ndarray]
log = logging.getLogger("dscompile")
MAX_BUCKETS = 8  # distinct shapes batched at once; more flush the fullest (bounds memory)


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | str, ...]  # ints are fixed, anything else is dynamic
    dtype: str

    @property
    def fixed_batch(self) -> int | None:
        """The fixed size of axis 0, or None where it is dynamic (or the input is a scalar)."""
        if not self.shape:
            return None
        d = self.shape[0]
        return d if isinstance(d, int) and d > 0 else None


def as_specs(specs: Iterable[Any]) -> tuple[InputSpec, ...]:
    out = []
    for s in specs:
        if isinstance(s, dict):
            name, shape, dtype = s["name"], s.get("shape", ()), s.get("dtype", "float32")
        else:
            name, shape, dtype = s.name, s.shape, getattr(s, "dtype", "float32")
        dims = tuple(d if isinstance(d, int) and d > 0 else str(d) for d in shape)
        out.append(InputSpec(str(name), dims, str(np.dtype(dtype))))
    if not out:
        raise InputError("the model has no inputs to feed")
    return tuple(out)


def _kind(dtype: np.dtype) -> str:
    return {"f": "float", "i": "int", "u": "int", "b": "bool"}.get(dtype.kind, dtype.kind)


def check_feed(feed: dict[str, Any], specs: Sequence[InputSpec], where: str) -> Feed:
    """A feed cast to the specs' dtypes, or InputError naming ``where`` and the input."""
    names = [s.name for s in specs]
    if set(feed) != set(names):
        missing = [n for n in names if n not in feed]
        extra = [k for k in feed if k not in names]
        detail = "; ".join(p for p in (
            f"missing: {', '.join(missing)}" if missing else "",
            f"unexpected: {', '.join(map(str, extra))}" if extra else "") if p)
        raise InputError(
            f"{where}: keys {', '.join(map(str, feed)) or '(none)'} do not match the model's inputs "
            f"{', '.join(names)} ({detail})"
        )
    out: Feed = {}
    for s in specs:
        a = np.asarray(feed[s.name])
        want = np.dtype(s.dtype)
        if a.dtype == object or _kind(a.dtype) != _kind(want):
            raise InputError(f"{where}: input {s.name} has dtype {a.dtype}, the model needs {want}")
        if a.ndim != len(s.shape):
            raise InputError(
                f"{where}: input {s.name} has rank {a.ndim} (shape {list(a.shape)}), "
                f"the model needs rank {len(s.shape)} (shape {list(s.shape)})"
            )
        for axis, (got, need) in enumerate(zip(a.shape, s.shape, strict=True)):
            if axis > 0 and isinstance(need, int) and got != need:
                raise InputError(
                    f"{where}: input {s.name} has shape {list(a.shape)}, the model needs {list(s.shape)}"
                )
        if a.dtype.kind == "f":
            bad = ~np.isfinite(a)
            if bad.any():
                what = "NaN" if np.isnan(a).any() else "Inf"
                raise InputError(f"{where}: input {s.name} contains {what} ({int(bad.sum())} values)")
        out[s.name] = np.ascontiguousarray(a, dtype=want)
    rows = {v.shape[0] for v in out.values() if v.ndim}
    if len(rows) > 1 and batchable(specs):
        raise InputError(f"{where}: inputs disagree on the batch size (axis 0: {sorted(rows)})")
    return out


def digest_feed(feed: Feed) -> bytes:
    h = hashlib.sha256()
    for name in sorted(feed):
        a = feed[name]
        h.update(f"{name}|{a.dtype.str}|{a.shape};".encode())
        h.update(a.tobytes())
    return h.digest()


def batchable(specs: Sequence[InputSpec]) -> bool:
    """Rows can be split and joined along axis 0 when every input has one."""
    return all(len(s.shape) > 0 for s in specs)


def rows_of(feed: Feed) -> int:
    first = next(iter(feed.values()))
    return int(first.shape[0]) if first.ndim else 1


def batches(feeds: Iterable[Feed], specs: Sequence[InputSpec], batch_size: int) -> Iterator[Feed]:
    """Re-cut a stream of feeds into batches the model accepts.

    A fixed axis 0 of size B gets exactly B rows per batch (rows left over at
    the end are dropped: the model cannot run them). A dynamic axis 0 gets up
    to ``batch_size`` rows of feeds whose other axes agree; feeds of different
    shapes wait in separate buckets.
    """
    if not batchable(specs):
        yield from feeds
        return
    fixed = {s.fixed_batch for s in specs}
    if len(fixed) > 1:
        raise InputError(f"the model's inputs disagree on a fixed batch size: {sorted(map(str, fixed))}")
    size = fixed.pop() or max(1, batch_size)
    exact = any(s.fixed_batch for s in specs)
    buckets: dict[tuple, list[Feed]] = {}
    for feed in feeds:
        key = tuple((k, v.shape[1:]) for k, v in sorted(feed.items()))
        bucket = buckets.setdefault(key, [])
        bucket.append(feed)
        if sum(map(rows_of, bucket)) >= size:
            yield from _drain(bucket, size, final=False)
        if len(buckets) > MAX_BUCKETS:
            fullest = max(buckets, key=lambda k: sum(map(rows_of, buckets[k])))
            yield from _drain(buckets.pop(fullest), size, final=not exact)
        for k in [k for k, b in buckets.items() if not b]:
            del buckets[k]
    for bucket in buckets.values():
        yield from _drain(bucket, size, final=not exact)
        if bucket:
            log.warning(f"{sum(map(rows_of, bucket))} rows left over were not used: the model takes exactly {size} rows at a time")


def _drain(bucket: list[Feed], size: int, final: bool) -> Iterator[Feed]:
    """Emit full batches of ``size`` rows from ``bucket`` (in place); with ``final`` also the rest."""
    joined = {k: np.concatenate([f[k] for f in bucket]) for k in bucket[0]} if len(bucket) > 1 else bucket[0]
    bucket.clear()
    total = rows_of(joined)
    start = 0
    while total - start >= size:
        yield {k: v[start:start + size] for k, v in joined.items()}
        start += size
    if start < total:
        rest = {k: v[start:] for k, v in joined.items()}
        if final:
            yield rest
        else:
            bucket.append(rest)
