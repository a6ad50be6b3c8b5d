"""``dscompile compile``: model in, verified artifact and report out."""

from __future__ import annotations

from pathlib import Path

import click

from dscompile import api, console
from dscompile.calibration.datasets import DataOptions
from dscompile.cli_common import (
    common_options,
    data_options,
    distill_options,
    emit_json,
    model_options,
    output_options,
    plan_options,
)
from dscompile.compiler.distill import DistillOptions
from dscompile.compiler.ingest import IngestOptions
from dscompile.pipeline import CompileOptions
from dscompile.planning import PlanSettings
from dscompile.targets.base import BuildOptions, target_names
from dscompile.targets.tensorrt_shapes import parse_shapes


@click.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", "-t", default="ort-cpu", show_default=True, help=f"One of: {', '.join(target_names())}.")
@click.option("--device", help="Device profile to plan and estimate for (see `dscompile devices`).")
@click.option("--verify-samples", type=int, default=16, show_default=True, help="Samples to verify the artifact on.")
@click.option("--threads", type=int, help="Threads for onnxruntime checks and timing.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--calib", type=click.Path(path_type=Path), metavar="PATH",
              help="Calibrate on this sample data (held-out samples verify), or use this calib.json.")
@click.option("--plan", "plan_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Build this plan.json as it is (hand edits honoured) instead of planning.")
@click.option("--fp32", "keep_fp32", is_flag=True, help="With --calib: verify on the data but build FP32.")
@click.option("--benchmark-binary", type=click.Path(path_type=Path, dir_okay=False), help="TFLite benchmark_model to push for --remote adb:SERIAL.")
@plan_options
@distill_options
@click.option("--remote", metavar="USER@HOST[:PORT] | adb:SERIAL",
              help="jetson-orin: build and time the engine on this board over SSH (key-based); snapdragon: time on this phone over ADB.")
@click.option("--dla", type=int, metavar="CORE", help="Use this DLA core (GPU fallback) and report DLA eligibility.")
@click.option("--shapes", multiple=True, metavar="NAME:MIN/OPT/MAX", help="Dynamic-input profile, dims as trtexec takes them, e.g. ids:1x8/1x16/8x64.")
@click.option("--build/--no-build", "build_engine", default=None, help="Build the engine here (needs TensorRT); default: where it imports.")
@data_options
@model_options
@output_options
@common_options
def command(model: Path, target: str, device: str | None, verify_samples: int, threads: int | None, seed: int,
            calib: Path | None, plan_file: Path | None, keep_fp32: bool, plan_settings: PlanSettings,
            plots: Path | None, distill: DistillOptions | None, bias_correction: bool, remote: str | None,
            benchmark_binary: Path | None, dla: int | None, shapes: tuple[str, ...], build_engine: bool | None,
            data_options: DataOptions, ingest_options: IngestOptions, output: Path | None, force: bool,
            as_json: bool) -> None:
    """Compile MODEL for a target, verify it, and write a report beside it.

    With --calib, calibrate on the data, plan mixed precision layer by layer
    (DMPQ), build, and repair on held-out samples until --min-fidelity holds.

    \b
    Examples:
      dscompile --target ort-cpu model.pt --input-shape x:1x3x224x224 -o model_cpu.onnx
      dscompile --target ort-cpu model.onnx --calib samples/ -o model_q.onnx
      dscompile --target ort-cpu model.pt --calib samples/ --budget kl=0.01 --min-fidelity cosine=0.995 -o model_q.onnx
      dscompile --target ort-cpu model.onnx --calib samples/ --distill -o model_q.onnx
      dscompile --target ort-cpu model.pt --calib samples/ --distill e2e --distill-steps 2000 -o model_q.onnx
    """
    options = CompileOptions(
        target=target, device=device, output=output, force=force, ingest=ingest_options,
        verify_samples=verify_samples, threads=threads, seed=seed, calib=calib, data=data_options,
        plan=plan_file, planning=plan_settings, quantize=not keep_fp32, plots=plots,
        distill=distill, bias_correction=bias_correction,
        target_options=BuildOptions(remote=remote, shapes=parse_shapes(shapes), dla=dla, build_engine=build_engine,
                                    benchmark_binary=benchmark_binary),
    )
    result = api.compile(model, target=target, options=options)
    if as_json:
        emit_json(result.report)
        return
    show_summary(result.report, result.output, result.report_path)


def show_summary(report: dict, output: Path, report_path: Path) -> None:
    from rich.table import Table

    fid, lat, size = report["fidelity"], report["latency"], report["size"]
    table = Table(title=f"{report['target']} · {report['device']}", show_header=False)
    table.add_row("artifact", str(output))
    table.add_row("report", str(report_path))
    table.add_row("size", f"{size['artifact_bytes']:,} bytes ({size['ratio']}× FP32)")
    table.add_row("precision", ", ".join(f"{k}: {v}" for k, v in report["precision"].items()))
    if fid.get("measured_with"):
        top1 = f", top-1 agreement {fid['top1_agreement']:.4f}" if fid.get("top1_agreement") is not None else ""
        table.add_row("fidelity", f"cosine {fid['cosine']:.6f}{top1} on {fid['samples']} samples")
    for r in report.get("rounds", []):
        f = r["fidelity"]
        top1 = f", top-1 {f['top1_agreement']:.4f}" if f.get("top1_agreement") is not None else ""
        moved = f"promoted {len(r['promoted'])} layer(s); " if r["promoted"] else ""
        table.add_row(f"repair round {r['round']}", f"{moved}cosine {f['cosine']:.5f}{top1}" + (" (goal met)" if r.get("met") else ""))
    dist = report.get("distillation") or {}
    if dist.get("layers"):
        b, a = dist["fidelity"]["before"], dist["fidelity"]["after"]
        what = "fell back to round-to-nearest (not better on held-out samples)" if dist["fell_back"] else \
            f"held-out error {b['nmse']:.4g} -> {a['nmse']:.4g}, cosine {b['cosine']:.5f} -> {a['cosine']:.5f}"
        table.add_row(f"distill ({dist['mode']})", f"{len(dist['layers'])} layers in {dist['time_s']:.1f} s: {what}")
    if lat.get("kind") == "measured":
        table.add_row("latency", f"p50 {lat['ms_p50']:.3f} ms (FP32 {lat['fp32_ms_p50']:.3f} ms), measured: {lat['where']}")
    console.out.print(table)
