"""``dscompile calibrate``: per-tensor ranges of a model on sample data -> calib.json (+ TensorRT cache)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from dscompile import api, console
from dscompile.calibration.datasets import DataOptions
from dscompile.calibration.table import METHODS
from dscompile.cli_common import (
    common_options,
    data_options,
    emit_json,
    model_options,
    output_options,
)
from dscompile.compiler.ingest import IngestOptions


@click.command("calibrate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", required=True, metavar="PATH|MODULE:FUNCTION",
              help="A folder of .npz files or images, one .npy/.npz stacked batch, or a generator (with --trust-code).")
@click.option("--trt-cache", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write a TensorRT calibration cache (scales of the first --method).")
@click.option("--method", "methods", multiple=True, type=click.Choice(METHODS),
              help="Threshold methods to compute (repeat; default: all four).")
@click.option("--percentile", type=click.FloatRange(0, 100, min_open=True), default=99.99, show_default=True,
              help="Percentile of |x| for the percentile method.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --max-samples subset.")
@data_options
@model_options
@output_options
@common_options
def command(model: Path, data: str, trt_cache: Path | None, methods: tuple[str, ...], percentile: float, seed: int,
            data_options: DataOptions, ingest_options: IngestOptions, output: Path | None, force: bool,
            as_json: bool) -> None:
    """Run MODEL on sample data and write per-tensor ranges (min, max, thresholds) to a calib.json.

    A rerun with the same model, data and settings reuses the table (--force recomputes).

    \b
    Examples:
      dscompile calibrate model.onnx --data samples/ -o calib.json --trt-cache calib.cache
      dscompile calibrate model.pt --input-shape x:1x3x224x224 --data images/ --image-size 224 \\
          --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 -o calib.json
    """
    result = api.calibrate(
        model, data, output, trt_cache=trt_cache, methods=methods or METHODS, percentile=percentile,
        data_options=replace(data_options, seed=seed), ingest_options=ingest_options, force=force,
    )
    summary = {
        "table": str(result.output), "trt_cache": str(result.trt_cache) if result.trt_cache else None,
        "reused": result.reused, "samples": result.table.samples, "tensors": len(result.table.tensors),
        "data": result.data, "model_sha256": result.table.model_sha256, "data_sha256": result.table.data_sha256,
    }
    if as_json:
        emit_json(summary)
        return
    how = "reused" if result.reused else "written"
    console.out.print(f"{result.output}: {how}, {summary['tensors']} tensors over {summary['samples']} samples")
    if result.trt_cache:
        console.out.print(f"{result.trt_cache}: TensorRT calibration cache ({(methods or METHODS)[0]})")
