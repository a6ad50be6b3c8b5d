"""Parsing of ``--input-shape`` and ``--dynamic`` options into TensorSpecs."""

from __future__ import annotations

import re

from dscompile.compiler.graph import Dim, TensorSpec
from dscompile.errors import InputError

_DTYPES = {"float32", "float16", "int64", "int32", "int8", "uint8", "bool", "float64"}
_SHAPE = re.compile(r"^(?:(?P<name>[^:]+):)?(?P<dims>[0-9]+(?:[x,][0-9]+)*)(?::(?P<dtype>\w+))?$")


def parse_input_shape(text: str, position: int = 0) -> TensorSpec:
    """``name:1x3x224x224[:dtype]``; without a name the spec is positional (name "")."""
    m = _SHAPE.match(text.strip())
    if not m:
        raise InputError(
            f"--input-shape {text!r}: expected NAME:DIMS[:DTYPE], e.g. x:1x3x224x224 or ids:1x128:int64"
        )
    dims = tuple(int(d) for d in re.split(r"[x,]", m["dims"]))
    if any(d <= 0 for d in dims):
        raise InputError(f"--input-shape {text!r}: every dimension must be a positive integer")
    dtype = m["dtype"] or "float32"
    if dtype not in _DTYPES:
        raise InputError(f"--input-shape {text!r}: unknown dtype {dtype!r} (one of {', '.join(sorted(_DTYPES))})")
    return TensorSpec(m["name"] or "", dims, dtype)


def name_positional(specs: list[TensorSpec]) -> list[TensorSpec]:
    """Give unnamed specs the names torch sources get: input, input1, input2, ..."""
    return [s if s.name else TensorSpec("input" if i == 0 else f"input{i}", s.shape, s.dtype) for i, s in enumerate(specs)]


def parse_dynamic(texts: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """``name:0`` or ``name:0,1`` -> {name: axes}."""
    out: dict[str, tuple[int, ...]] = {}
    for text in texts:
        name, _, axes = text.partition(":")
        try:
            out[name] = tuple(int(a) for a in axes.split(","))
        except ValueError:
            raise InputError(f"--dynamic {text!r}: expected NAME:AXIS[,AXIS], e.g. x:0") from None
        if not name:
            raise InputError(f"--dynamic {text!r}: expected NAME:AXIS[,AXIS], e.g. x:0")
    return out


def with_dynamic(spec: TensorSpec, axes: tuple[int, ...]) -> TensorSpec:
    dims: list[Dim] = list(spec.shape)
    for a in axes:
        if not -len(dims) <= a < len(dims):
            raise InputError(f"--dynamic {spec.name}:{a}: axis out of range for shape {spec.shape}")
        dims[a] = f"{spec.name}_dim{a % len(dims)}"
    return TensorSpec(spec.name, tuple(dims), spec.dtype)


def override_specs(graph_specs: tuple[TensorSpec, ...], given: list[TensorSpec]) -> tuple[TensorSpec, ...]:
    """Check user shapes against an ONNX graph's inputs and fill dynamic dims with them."""
    if not given:
        return graph_specs
    by_name = {s.name: s for s in graph_specs}
    given = [TensorSpec(graph_specs[i].name, g.shape, g.dtype) if not g.name and i < len(graph_specs) else g
             for i, g in enumerate(given)]
    for g in given:
        if g.name not in by_name:
            raise InputError(
                f"--input-shape {g.name}: the model has no input of that name (inputs: {', '.join(by_name)})"
            )
        s = by_name[g.name]
        if len(s.shape) != len(g.shape) or any(
            isinstance(a, int) and a != b for a, b in zip(s.shape, g.shape, strict=False)
        ):
            raise InputError(f"--input-shape {g.name}: shape {g.shape} does not match the model's {s.shape}")
    given_by = {g.name: g for g in given}
    return tuple(
        TensorSpec(s.name, given_by[s.name].shape, s.dtype) if s.name in given_by else s for s in graph_specs
    )
