"""``dscompile inspect``: what is in a model."""

from __future__ import annotations

from pathlib import Path

import click

from dscompile import api, console
from dscompile.cli_common import common_options, emit_json, model_options
from dscompile.compiler.ingest import IngestOptions


@click.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@model_options
@common_options
def command(model: Path, ingest_options: IngestOptions, as_json: bool) -> None:
    """Print a model's ops by type, parameters, bytes, MACs, inputs and outputs.

    \b
    Examples:
      dscompile inspect model.onnx
      dscompile inspect model.pt --input-shape x:1x3x224x224 --json
    """
    info = api.inspect(model, ingest_options)
    if as_json:
        emit_json(info)
        return
    from rich.table import Table

    t = Table(title=f"{info['path']} ({info['format']})", show_header=False)
    t.add_row("opsets", ", ".join(f"{k} {v}" for k, v in info["opsets"].items()))
    for s in info["inputs"]:
        t.add_row("input", f"{s['name']} {s['dtype']} {s['shape']}")
    for s in info["outputs"]:
        t.add_row("output", f"{s['name']} {s['dtype']} {s['shape']}")
    t.add_row("nodes", str(info["nodes"]))
    t.add_row("parameters", f"{info['parameters']:,} ({info['parameter_bytes']:,} bytes)")
    t.add_row("MACs", f"{info['macs']:,}" + ("" if info["macs"] else " (shapes unknown)"))
    t.add_row("ops", ", ".join(f"{k} {v}" for k, v in info["ops"].items()))
    console.out.print(t)
