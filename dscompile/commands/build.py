"""``dscompile build``: lower a plan.json exactly as written, verify, write artifact + report."""

from __future__ import annotations

from pathlib import Path

import click

from dscompile import api
from dscompile.calibration.datasets import DataOptions
from dscompile.cli_common import (
    common_options,
    data_options,
    distill_options,
    emit_json,
    model_options,
    output_options,
)
from dscompile.commands.compile import show_summary
from dscompile.compiler.distill import DistillOptions
from dscompile.compiler.ingest import IngestOptions
from dscompile.pipeline import CompileOptions
from dscompile.targets.base import target_names


@click.command("build")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--plan", "plan_file", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="The plan.json to build (from `dscompile plan`, hand edits allowed).")
@click.option("--target", "-t", default="ort-cpu", show_default=True, help=f"One of: {', '.join(target_names())}.")
@click.option("--device", help="Device profile (default: the target's).")
@click.option("--calib", type=click.Path(path_type=Path), metavar="PATH",
              help="calib.json (ranges the plan lacks) or sample data (also verifies on held-out samples).")
@click.option("--verify-samples", type=int, default=16, show_default=True, help="Samples to verify on.")
@click.option("--threads", type=int, help="Threads for onnxruntime checks and timing.")
@click.option("--seed", type=int, default=0, show_default=True)
@distill_options
@data_options
@model_options
@output_options
@common_options
def command(model: Path, plan_file: Path, target: str, device: str | None, calib: Path | None, verify_samples: int,
            threads: int | None, seed: int, distill: DistillOptions | None, bias_correction: bool,
            data_options: DataOptions, ingest_options: IngestOptions, output: Path | None, force: bool,
            as_json: bool) -> None:
    """Build MODEL as PLAN says, layer by layer; a precision the target cannot run is rejected with the reason.

    With --calib DATA, the plan's weight-quantised layers get bias correction
    (unless --no-bias-correction), or are distilled with --distill; precisions
    stay as the plan says.

    \b
    Examples:
      dscompile build model.onnx --target ort-cpu --plan plan.json --calib calib.json -o model_q.onnx
      dscompile build model.onnx --plan plan.json -o model_q.onnx --force
      dscompile build model.onnx --plan plan.json --calib samples/ --distill -o model_q.onnx
    """
    options = CompileOptions(
        target=target, device=device, output=output, force=force, ingest=ingest_options,
        verify_samples=verify_samples, threads=threads, seed=seed, data=data_options,
        distill=distill, bias_correction=bias_correction,
    )
    result = api.build(model, plan_file, target=target, output=output, calib=calib, options=options)
    if as_json:
        emit_json(result.report)
        return
    show_summary(result.report, result.output, result.report_path)
