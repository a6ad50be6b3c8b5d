"""``dscompile demo``: the main job on a built-in example, end to end."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np

from dscompile import api, console
from dscompile.cli_common import common_options, emit_json
from dscompile.commands.compile import show_summary
from dscompile.compiler.allocate import parse_budget
from dscompile.compiler.ingest import IngestOptions
from dscompile.compiler.shapes import parse_input_shape
from dscompile.pipeline import CompileOptions
from dscompile.planning import PlanSettings
from dscompile.targets.base import get_target, target_names


@click.command("demo")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False),
              help="Folder for the demo's files (default: a new temporary folder).")
@click.option("--force", is_flag=True, help="Reuse a non-empty output folder, overwriting its files.")
@common_options
def command(output: Path | None, force: bool, as_json: bool) -> None:
    """Train a small CNN on scikit-learn's digits, save it as TorchScript, and compile it
    for every target available here: calibrated on real digits, mixed precision under a
    size budget, verified on held-out digits, then the FPS matrix.

    \b
    Example:
      dscompile demo
      dscompile demo -o demo_out --json
    """
    import torch

    from dscompile.examples import train_digits_cnn

    folder = output or Path(tempfile.mkdtemp(prefix="dscompile-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()) and not force and output is not None:
        raise click.UsageError(f"{folder} is not empty (use --force to overwrite its files)")
    console.log.info("training the digits CNN (scikit-learn's bundled digits)...")
    model, accuracy, data = train_digits_cnn()
    console.log.info(f"test accuracy {accuracy:.4f}")
    ts_path = folder / "digits_cnn.pt"
    torch.jit.save(torch.jit.trace(model, torch.from_numpy(data.x_test[:1])), str(ts_path))
    # Sample data as a user would bring it: a stacked .npy batch of real digits.
    calib_path = folder / "digits_samples.npy"
    np.save(calib_path, data.x_train[:DEMO_SAMPLES])
    reports = {}
    artifacts = []
    for name in target_names():
        target = get_target(name)
        ok, why = target.available()
        if not ok:
            console.log.warning(f"skipping target {name}: {why}")
            continue
        out = folder / f"digits_cnn.{name}" if target.output_kind == "dir" else folder / f"digits_cnn.{name}{target.suffix}"
        opts = CompileOptions(
            target=name, output=out, force=True, calib=calib_path,
            ingest=IngestOptions(input_shapes=(parse_input_shape("x:1x1x8x8"),)),
            planning=PlanSettings(budget=parse_budget(DEMO_BUDGET)),
        )
        result = api.compile(ts_path, target=name, options=opts)
        reports[name] = result.report
        artifacts.append(result.output)
        if not as_json:
            show_summary(result.report, result.output, result.report_path)
    matrix = _matrix(artifacts, folder)
    if as_json:
        emit_json({"folder": str(folder), "accuracy": accuracy, "reports": reports, "matrix": matrix.to_json()})
    else:
        from dscompile.commands.profile import show_matrix

        show_matrix(matrix)
        console.out.print(f"demo files in {folder} (the FPS matrix in {folder / 'matrix'}/)")


DEMO_SAMPLES = 256
DEMO_BUDGET = "size=0.3"  # a third of the FP32 bytes: DMPQ picks which layers go low
DEMO_DEVICES = ("this-cpu", "jetson-agx-orin-64gb", "jetson-orin-nano-8gb", "snapdragon-8-gen2")


def _matrix(artifacts: list[Path], folder: Path):
    """The demo ends with the FPS matrix of what it built: measured here, estimated on the edge devices."""
    from dscompile.profiler import ProfileOptions
    from dscompile.profiles.measure import Settings

    console.log.info("profiling: measured on this machine, estimated from the device profiles...")
    opts = ProfileOptions(devices=DEMO_DEVICES, precisions=("fp32", "fp16", "int8"),
                          settings=Settings(budget_s=1.0))
    return api.profile(artifacts, output=folder / "matrix", force=True, options=opts)
