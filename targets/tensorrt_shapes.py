"""Optimization profiles for dynamic inputs: ``--shapes NAME:MIN/OPT/MAX`` in trtexec's dims syntax.

TensorRT builds an engine for one range of input shapes (min, opt, max per dynamic input, as
trtexec's --minShapes/--optShapes/--maxShapes take them). Without --shapes, a profile is derived
from the shapes the calibration samples had (smallest, median, largest per axis, batch 1), and
said in the log; with neither, the model is refused before anything is written, naming the flag.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

from dscompile.calibration.shapes import seen_shapes
from dscompile.calibration.table import CalibrationTable
from dscompile.compiler.graph import TensorSpec
from dscompile.errors import InputError

log = logging.getLogger("dscompile")

KINDS = ("min", "opt", "max")
_ITEM = re.compile(r"^(?P<name>.+):(?P<dims>[0-9x]+)/(?P<opt>[0-9x]+)/(?P<max>[0-9x]+)$")

Profile = dict[str, dict[str, tuple[int, ...]]]  # {"min"|"opt"|"max": {input: dims}}


def _dims(text: str, item: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split("x"))
    except ValueError:
        raise InputError(f"--shapes {item!r}: dims must be integers joined by x, e.g. 1x3x224x224") from None
    if not dims or any(d <= 0 for d in dims):
        raise InputError(f"--shapes {item!r}: every dimension must be a positive integer")
    return dims


def parse_shapes(items: Iterable[str]) -> Profile | None:
    """``["ids:1x8/1x16/8x64", ...]`` -> {"min": {"ids": (1, 8)}, "opt": ..., "max": ...}; None if empty."""
    profile: Profile = {k: {} for k in KINDS}
    for raw in items:
        for item in (s.strip() for s in raw.split(",") if s.strip()):
            m = _ITEM.match(item)
            if not m:
                raise InputError(
                    f"--shapes {item!r}: expected NAME:MIN/OPT/MAX with trtexec dims, e.g. ids:1x8/1x16/8x64"
                )
            name = m["name"]
            lo, opt, hi = (_dims(m[g], item) for g in ("dims", "opt", "max"))
            if not len(lo) == len(opt) == len(hi):
                raise InputError(f"--shapes {item!r}: min, opt and max must have the same rank")
            if any(not a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
                raise InputError(f"--shapes {item!r}: need min <= opt <= max in every dimension")
            for kind, dims in zip(KINDS, (lo, opt, hi), strict=True):
                profile[kind][name] = dims
    return profile if profile["opt"] else None


def dynamic_inputs(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    return [s for s in specs if not s.is_static]


def profile_from_calibration(specs: Sequence[TensorSpec], table: CalibrationTable | None) -> Profile | None:
    """A profile for every dynamic input from the shapes calibration saw (None if it saw none)."""
    dynamic = dynamic_inputs(specs)
    seen = seen_shapes(table.extra) if table is not None else {}
    if not dynamic or any(s.name not in seen or len(seen[s.name]["opt"]) != len(s.shape) for s in dynamic):
        return None
    profile: Profile = {k: {s.name: seen[s.name][k] for s in dynamic} for k in KINDS}
    _say_once(f"no --shapes: TensorRT profile from the calibration samples' shapes (batch 1): --shapes "
              f"{shapes_arg(profile)} (give --shapes to build for other sizes)")
    return profile


def shapes_arg(profile: Profile) -> str:
    """The profile as --shapes takes it: ``a:1x8/1x16/1x64,b:...``."""
    return ",".join(f"{n}:{'/'.join('x'.join(map(str, profile[k][n])) for k in KINDS)}" for n in profile["opt"])


@functools.lru_cache(maxsize=8)
def _say_once(message: str) -> None:
    log.info(message)  # lower() runs once per repair round; the profile is said once


def check_profile(specs: Sequence[TensorSpec], profile: dict[str, Any] | None,
                  table: CalibrationTable | None = None) -> Profile | None:
    """Refuse a dynamic model without a profile, and a profile that does not fit the inputs.

    With no profile given, one is derived from ``table``'s recorded input shapes when it has them.
    """
    dynamic = dynamic_inputs(specs)
    if not profile and dynamic:
        profile = profile_from_calibration(specs, table)
    by_name = {s.name: s for s in specs}
    if profile:
        for name in profile["opt"]:
            if name not in by_name:
                raise InputError(f"--shapes {name}: the model has no input of that name (inputs: {', '.join(by_name)})")
            spec = by_name[name]
            for kind in KINDS:
                dims = profile[kind][name]
                if len(dims) != len(spec.shape) or any(
                    isinstance(d, int) and d != g for d, g in zip(spec.shape, dims, strict=False)
                ):
                    raise InputError(f"--shapes {name}: {kind} shape {'x'.join(map(str, dims))} does not fit the input's {list(spec.shape)}")
    missing = [s for s in dynamic if not profile or s.name not in profile["opt"]]
    if missing:
        s = missing[0]
        example = "/".join("x".join(str(d if isinstance(d, int) else n) for d in s.shape) for n in (1, 8, 32))
        raise InputError(
            f"input {s.name!r} has dynamic shape {list(s.shape)} and TensorRT needs a profile for it: "
            f"give --shapes {s.name}:MIN/OPT/MAX as trtexec takes them, e.g. --shapes {s.name}:{example} "
            "(or --calib sample data, whose shapes then set the profile)"
        )
    return profile  # type: ignore[return-value]


def trtexec_shape_args(profile: Profile | None) -> list[str]:
    """``--minShapes=a:1x8,b:...`` ``--optShapes=...`` ``--maxShapes=...`` (empty for static models)."""
    if not profile:
        return []
    flags = {"min": "--minShapes", "opt": "--optShapes", "max": "--maxShapes"}
    return [
        f"{flags[k]}=" + ",".join(f"{n}:{'x'.join(map(str, d))}" for n, d in profile[k].items()) for k in KINDS
    ]
