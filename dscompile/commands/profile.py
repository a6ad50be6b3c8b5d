"""``dscompile profile``: the FPS matrix (model x device x precision), measured or estimated."""

from __future__ import annotations

from pathlib import Path

import click

from dscompile import api, console
from dscompile.cli_common import common_options, emit_json, model_options
from dscompile.compiler.capabilities import PRECISIONS
from dscompile.compiler.ingest import IngestOptions

MATRIX_PRECISIONS = (*PRECISIONS, "mixed")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in _csv(text))
    except ValueError:
        raise click.BadParameter(f"{text!r}: give batch sizes as integers, e.g. 1,8") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r}: batch sizes must be at least 1")
    return values


@click.command("profile")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--devices", default="this-cpu", show_default=True,
              help="Comma-separated: this-cpu and device profiles (see `dscompile devices`).")
@click.option("--precisions", default="fp32", show_default=True,
              help=f"Comma-separated, for models (artifacts run at their own): {', '.join(MATRIX_PRECISIONS)}.")
@click.option("--batches", default="1", show_default=True, help="Batch sizes of the estimated cells, e.g. 1,8.")
@click.option("--threads", type=int, help="Threads for measurements on this machine (default: all cores).")
@click.option("--budget", type=float, default=3.0, show_default=True, help="Seconds of timing per batch size.")
@click.option("--no-batch-search", is_flag=True, help="Measure batch 1 only (skip the best-batch search).")
@click.option("--remote", help="user@host[:port] (a Jetson, over SSH) or adb:SERIAL (a phone): also measure on that "
              "board, as the first listed device of that kind.")
@click.option("--benchmark-binary", type=click.Path(path_type=Path, dir_okay=False),
              help="TFLite benchmark_model to push for --remote adb:SERIAL.")
@click.option("--sources", "show_sources", is_flag=True, help="Show where each number comes from.")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False),
              help="Folder for matrix.json/.csv/.md/.png.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@model_options
@common_options
def command(inputs: tuple[Path, ...], devices: str, precisions: str, batches: str, threads: int | None,
            budget: float, no_batch_search: bool, remote: str | None, benchmark_binary: Path | None,
            show_sources: bool, output: Path | None, force: bool, ingest_options: IngestOptions,
            as_json: bool) -> None:
    """Frames per second and latency of models or built artifacts, per device and precision.

    Cells on this machine are measured (onnxruntime, LiteRT when installed); cells on
    profiled devices are estimated from their profile (roofline, fitted on published
    figures); every cell says which, and a cell with no number says why.

    \b
    Examples:
      dscompile profile model.onnx --devices this-cpu,jetson-agx-orin-64gb,snapdragon-8-gen2 \\
          --precisions fp32,fp16,int8 -o matrix/
      dscompile profile build_orin/ build_cpu/model_q.onnx model.tflite -o matrix/
    """
    from dscompile.profiler import ProfileOptions
    from dscompile.profiles.measure import Settings

    bad = [p for p in _csv(precisions) if p not in MATRIX_PRECISIONS]
    if bad:
        raise click.BadParameter(f"unknown precision {bad[0]!r} (known: {', '.join(MATRIX_PRECISIONS)})",
                                 param_hint="--precisions")
    opts = ProfileOptions(
        devices=_csv(devices), precisions=_csv(precisions), batches=_batches(batches),
        settings=Settings(threads=threads, budget_s=budget, best_batch=not no_batch_search),
        remote=remote, ingest=ingest_options, benchmark_binary=benchmark_binary,
    )
    matrix = api.profile(list(inputs), output=output, force=force, options=opts)
    if as_json:
        emit_json(matrix.to_json())
        return
    show_matrix(matrix, show_sources)
    if output is not None:
        console.out.print(f"matrix written to {output}/ (matrix.json, matrix.csv, matrix.md, matrix.png)")


def show_matrix(matrix, show_sources: bool = False) -> None:
    """One row per cell; why a cell is missing (and, with --sources, where numbers come from) below."""
    from rich.table import Table

    table = Table(title="FPS matrix: measured here, ~ estimated from the device profile, — missing")
    for col in ("model", "device", "precision", "batch", "FPS", "p50 ms", "p99 ms", "kind", "note"):
        table.add_column(col, justify="right" if col in ("batch", "FPS", "p50 ms", "p99 ms", "note") else "left")
    notes: dict[str, int] = {}
    for c in matrix.cells:
        text = c.source if (c.kind == "missing" or show_sources) else ""
        mark = f"[{notes.setdefault(text, len(notes) + 1)}]" if text else ""
        fps = "—" if c.fps is None else (("~" if c.kind == "estimated" else "") + _fps(c.fps))
        table.add_row(c.model, c.device, c.precision, str(c.batch), fps, _ms(c.p50_ms), _ms(c.p99_ms), c.kind, mark)
    # Piped output has no terminal width: print the table whole rather than squeezed to 80 columns.
    if console.out.is_terminal:
        console.out.print(table)
    else:
        from rich.console import Console

        Console(width=200, highlight=False).print(table)
    for text, i in notes.items():
        console.out.print(f"[{i}] {text}", markup=False, highlight=False)


def _fps(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"
