"""Option groups shared between commands (click lives only in the CLI modules)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dscompile import console
from dscompile.compiler.ingest import IngestOptions
from dscompile.compiler.shapes import parse_dynamic, parse_input_shape


def common_options(f: Callable) -> Callable:
    """-q/-v/--debug/--json on every command."""

    @click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
    @click.option("--debug", is_flag=True, help="Show tracebacks.")
    @click.option("-v", "--verbose", count=True, help="More detail on stderr.")
    @click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
    @functools.wraps(f)
    def wrapper(*args: Any, quiet: bool, verbose: int, debug: bool, **kwargs: Any) -> Any:
        console.configure(-1 if quiet else verbose)
        return f(*args, **kwargs)

    return wrapper


def model_options(f: Callable) -> Callable:
    """How to read a model: shapes, dynamic axes, pickle trust, export check."""

    @click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS[:DTYPE]",
                  help="Input shape, e.g. x:1x3x224x224 (repeat per input; dtype defaults to float32).")
    @click.option("--dynamic", multiple=True, metavar="NAME:AXIS", help="Mark an axis dynamic, e.g. x:0.")
    @click.option("--trust-pickle", is_flag=True,
                  help="Allow loading a pickled nn.Module (unpickling runs code from the file).")
    @click.option("--export-rtol", type=float, default=1e-3, show_default=True,
                  help="Max relative error of the ONNX export against torch.")
    @click.option("--no-simplify", is_flag=True, help="Skip onnx-simplifier.")
    @functools.wraps(f)
    def wrapper(*args: Any, input_shapes: tuple[str, ...], dynamic: tuple[str, ...], trust_pickle: bool,
                export_rtol: float, no_simplify: bool, **kwargs: Any) -> Any:
        kwargs["ingest_options"] = IngestOptions(
            input_shapes=tuple(parse_input_shape(s, i) for i, s in enumerate(input_shapes)),
            dynamic=parse_dynamic(dynamic), trust_pickle=trust_pickle, export_rtol=export_rtol,
            simplify=not no_simplify,
        )
        return f(*args, **kwargs)

    return wrapper


def output_options(f: Callable) -> Callable:
    @click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the result.")
    @click.option("--force", is_flag=True, help="Overwrite an existing output.")
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return f(*args, **kwargs)

    return wrapper


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))
