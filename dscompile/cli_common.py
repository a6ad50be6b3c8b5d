"""Option groups shared between commands (click lives only in the CLI modules)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dscompile import console
from dscompile.calibration.datasets import DataOptions
from dscompile.calibration.images import make_preprocess
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


def data_options(f: Callable) -> Callable:
    """How to read calibration data (the path itself is each command's own option): -> ``data_options``."""

    @click.option("--max-samples", type=click.IntRange(min=1), metavar="N",
                  help="Use at most N samples (a seeded subset, kept in file order).")
    @click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                  help="Rows per onnxruntime run where the model's batch axis is dynamic and shapes agree.")
    @click.option("--image-size", metavar="N|HxW", help="Image folders: final size (default: the model input's).")
    @click.option("--resize", type=click.IntRange(min=1), metavar="N",
                  help="Image folders: shorter side before the centre crop (default: the image size).")
    @click.option("--mean", metavar="M[,M,M]", help="Image folders: per-channel mean, after --scale.")
    @click.option("--std", metavar="S[,S,S]", help="Image folders: per-channel std, after --scale.")
    @click.option("--scale", type=float, help="Image folders: pixel multiplier, applied first (default 1/255).")
    @click.option("--layout", type=click.Choice(["NCHW", "NHWC"], case_sensitive=False),
                  help="Image folders: tensor layout (default: guessed from the model input).")
    @click.option("--bgr", is_flag=True, default=None, help="Image folders: feed channels in BGR order.")
    @click.option("--preprocess", "preprocess_file", type=click.Path(path_type=Path, dir_okay=False),
                  help="Image folders: a TOML preprocessing spec (options above override it).")
    @click.option("--trust-code", is_flag=True,
                  help="Allow MODULE:FUNCTION data generators (runs that Python code).")
    @functools.wraps(f)
    def wrapper(*args: Any, max_samples: int | None, batch_size: int, image_size: str | None, resize: int | None,
                mean: str | None, std: str | None, scale: float | None, layout: str | None, bgr: bool | None,
                preprocess_file: Path | None, trust_code: bool, **kwargs: Any) -> Any:
        pre = make_preprocess(size=image_size, resize=resize, mean=mean, std=std, scale=scale, layout=layout,
                              bgr=bgr or None)
        kwargs["data_options"] = DataOptions(
            max_samples=max_samples, batch_size=batch_size, preprocess=pre,
            preprocess_file=preprocess_file, trust_code=trust_code,
        )
        return f(*args, **kwargs)

    return wrapper


def plan_options(f: Callable) -> Callable:
    """DMPQ planning: budget, fidelity floor, repair rounds, plots -> ``plan_settings``, ``plots``."""
    from dscompile.compiler.allocate import parse_budget
    from dscompile.compiler.repair import parse_goal
    from dscompile.planning import PlanSettings

    @click.option("--budget", metavar="KIND=VALUE",
                  help="kl=<summed sensitivity> (default kl=0.01: least cost within it), size=<fraction of FP32 "
                       "bytes> or latency=<fraction of FP32 latency> (least sensitivity within it).")
    @click.option("--min-fidelity", metavar="METRIC=VALUE",
                  help="Repair until held-out fidelity reaches it: cosine=0.995, top1=0.99, auto=0.99 (the "
                       "default: top-1 agreement for score outputs, cosine otherwise), or MODULE:FUNCTION=V, your "
                       "own metric (with --trust-code): FUNCTION(reference_outputs, outputs, feed) -> score, "
                       "averaged over the held-out samples.")
    @click.option("--repair-rounds", type=click.IntRange(min=0), default=6, show_default=True,
                  help="Most repair rounds before giving up.")
    @click.option("--sensitivity-samples", type=click.IntRange(min=1), default=16, show_default=True,
                  help="Calibration samples the per-layer sensitivity is measured on.")
    @click.option("--plots", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
                  help="Write sensitivity.png and allocation.png into DIR.")
    @functools.wraps(f)
    def wrapper(*args: Any, budget: str | None, min_fidelity: str | None, repair_rounds: int,
                sensitivity_samples: int, plots: Path | None, **kwargs: Any) -> Any:
        trust = bool(click.get_current_context().params.get("trust_code"))
        settings = PlanSettings(min_fidelity=parse_goal(min_fidelity or "auto=0.99", trust), rounds=repair_rounds,
                                sensitivity_samples=sensitivity_samples)
        if budget:
            settings = PlanSettings(parse_budget(budget), settings.min_fidelity, repair_rounds, sensitivity_samples)
        kwargs["plan_settings"] = settings
        kwargs["plots"] = plots
        return f(*args, **kwargs)

    return wrapper


def distill_options(f: Callable) -> Callable:
    """Distillation after planning -> ``distill`` (DistillOptions or None) and ``bias_correction``."""
    from dscompile.compiler.distill import DistillOptions

    @click.option("--distill", type=click.Choice(["layer", "e2e", "bias"]), is_flag=False, flag_value="layer",
                  default=None, metavar="[layer|e2e]",
                  help="Teach the quantised layers with the FP32 model: layer (default: AdaRound reconstruction, "
                       "any ONNX) or e2e (quantisation-aware distillation, torch sources). Needs --calib DATA.")
    @click.option("--distill-steps", type=click.IntRange(min=1), metavar="N",
                  help="Steps per layer (layer, default 1000) or in total (e2e, default 2000).")
    @click.option("--distill-time", type=click.FloatRange(min=1), metavar="SECONDS",
                  help="Wall time of the distillation stage: checks, capture and learning (default 300); the "
                       "schedules shorten to fit, and layers it does not reach stay round-to-nearest.")
    @click.option("--distill-samples", type=click.IntRange(min=2), default=256, show_default=True, metavar="N",
                  help="Calibration samples to learn from (a quarter more are held out to check the result).")
    @click.option("--distill-lsq", is_flag=True, help="Layer mode: also learn the input step sizes (LSQ).")
    @click.option("--no-bias-correction", is_flag=True,
                  help="Skip bias correction (on by default for layers with quantised weights).")
    @functools.wraps(f)
    def wrapper(*args: Any, distill: str | None, distill_steps: int | None, distill_time: float | None,
                distill_samples: int, distill_lsq: bool, no_bias_correction: bool, **kwargs: Any) -> Any:
        if distill is None and (distill_steps or distill_time or distill_lsq):
            raise click.UsageError("--distill-steps/--distill-time/--distill-lsq need --distill")
        kwargs["distill"] = None if distill is None else DistillOptions(
            mode=distill, steps=distill_steps, time_s=distill_time, max_samples=distill_samples,
            learn_activations=distill_lsq, bias_correction=not no_bias_correction)
        kwargs["bias_correction"] = not no_bias_correction
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
