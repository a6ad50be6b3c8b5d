"""``dscompile plan``: per-layer mixed precision (DMPQ) for a model on sample data -> plan.json."""

from __future__ import annotations

from pathlib import Path

import click

from dscompile import api, console
from dscompile.calibration.datasets import DataOptions
from dscompile.cli_common import (
    common_options,
    data_options,
    emit_json,
    model_options,
    output_options,
    plan_options,
)
from dscompile.compiler.ingest import IngestOptions
from dscompile.planning import PlanSettings
from dscompile.targets.base import target_names


@click.command("plan")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", "-t", default="ort-cpu", show_default=True, help=f"One of: {', '.join(target_names())}.")
@click.option("--device", help="Device profile to cost for (default: this machine, measured).")
@click.option("--calib", required=True, metavar="DATA",
              help="Sample data (folder of .npz / images, .npy/.npz batch, or generator with --trust-code).")
@click.option("--verify-samples", type=int, default=16, show_default=True,
              help="Samples held out of calibration to repair the plan on.")
@click.option("--threads", type=int, help="Threads for onnxruntime.")
@click.option("--seed", type=int, default=0, show_default=True)
@plan_options
@data_options
@model_options
@output_options
@common_options
def command(model: Path, target: str, device: str | None, calib: str, verify_samples: int, threads: int | None,
            seed: int, plan_settings: PlanSettings, plots: Path | None, data_options: DataOptions,
            ingest_options: IngestOptions, output: Path | None, force: bool, as_json: bool) -> None:
    """Choose a precision per layer of MODEL and write the plan (editable JSON).

    \b
    Examples:
      dscompile plan model.onnx --target ort-cpu --calib samples/ --budget size=0.25 -o plan.json
      dscompile plan model.onnx --calib samples/ --min-fidelity top1=0.99 --plots plots/ -o plan.json
    """
    out = output or Path(model).with_suffix(".plan.json")
    result = api.plan(model, calib, out, target=target, device=device, settings=plan_settings,
                      data_options=data_options, ingest_options=ingest_options, verify_samples=verify_samples,
                      threads=threads, seed=seed, plots=plots, force=force)
    if as_json:
        emit_json(result.plan.to_json())
        return
    show_plan(result.plan, result.output, result.plots)


def show_plan(plan, output: Path, plots: list[Path]) -> None:
    from rich.table import Table

    pred = plan.predicted
    t = Table(title=f"plan · {plan.target} · {plan.device}", show_header=False)
    t.add_row("plan", str(output))
    t.add_row("budget", ", ".join(f"{k}={v}" for k, v in plan.budget.items()))
    t.add_row("precision", ", ".join(f"{k}: {v}" for k, v in plan.precision_counts().items()))
    t.add_row("predicted", f"size {pred.get('size_ratio')}× FP32, latency {pred.get('latency_ratio')}× FP32 "
                           f"({pred.get('cost_source', '')}), sensitivity {pred.get('sensitivity', {}).get('value')} "
                           f"{plan.sensitivity_metric}")
    for r in plan.rounds:
        f = r["fidelity"]
        top1 = f", top-1 {f['top1_agreement']:.4f}" if f.get("top1_agreement") is not None else ""
        t.add_row(f"round {r['round']}", f"promoted {len(r['promoted'])}; cosine {f['cosine']:.5f}{top1} "
                                         f"on {f['samples']} held-out samples" + (" (goal met)" if r.get("met") else ""))
    for p in plots:
        t.add_row("plot", str(p))
    console.out.print(t)
