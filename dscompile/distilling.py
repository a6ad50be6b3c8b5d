"""The distillation stage of the pipeline (between plan and build): which samples it learns from,
its progress bar, and the target builds it measures before/after with.

    distiller = make_distiller(target, ingested, calibrated, options, device)
    plan = plan_stage(..., prepare=distiller.repair_hook())   # repair rounds see distilled weights
    graph, plan, report = distiller.final(plan)
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from dscompile import console
from dscompile.calibration.table import CalibrationTable
from dscompile.compiler.distill import Distiller, DistillOptions, DistillResult
from dscompile.compiler.graph import ModelGraph
from dscompile.compiler.plan import QuantPlan
from dscompile.errors import InputError
from dscompile.targets.base import BuildOptions

log = logging.getLogger("dscompile")
Feed = dict[str, np.ndarray]
BIAS_ONLY_SAMPLES = 64  # bias correction (on by default) needs few samples: keep the default build quick


class DistillBar:
    """A live bar on a terminal (layer, step, loss); nothing otherwise (the stage logs a summary)."""

    def __init__(self) -> None:
        self._bar = None
        self._task = None

    def __enter__(self) -> DistillBar:
        if console.stderr_is_terminal():
            from rich import progress as rp

            self._bar = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                                    rp.TextColumn("{task.fields[loss]}"), rp.TimeElapsedColumn(),
                                    console=console.err, transient=True)
            self._bar.start()
            self._task = self._bar.add_task("distill", total=1, loss="")
        return self

    def __call__(self, layer: str, index: int, count: int, step: int, steps: int, loss: float) -> None:
        if self._bar is not None:
            where = f"distill {layer} ({index + 1}/{count})" if count > 1 else f"distill {layer}"
            self._bar.update(self._task, description=where, completed=step, total=steps, loss=f"loss {loss:.3g}")

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def target_run_plan(target, table: CalibrationTable | None, device: str, threads: int | None, seed: int):
    """A RunPlan for compiler.distill: build the plan with the target in a scratch folder and run it."""

    def run(graph: ModelGraph, plan: QuantPlan, feeds: Sequence[Feed]) -> tuple[list[list[np.ndarray]], str]:
        stage = Path(tempfile.mkdtemp(prefix="dscompile-distill-"))
        try:
            artifact = target.lower(graph, plan, table, stage, BuildOptions(seed, threads, device))
            runner = target.runner(artifact, threads)
            if runner is None:
                raise InputError(f"target {target.name} has no runtime here to check distillation with")
            return [runner.run(f) for f in feeds], f"the {target.name} artifact, {runner.where()}"
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    return run


class DistillStage:
    """One Distiller for the final plan, and a layer-mode one (sharing its cache) for repair rounds."""

    def __init__(self, final: Distiller, repair: Distiller) -> None:
        self.final_distiller, self.repair_distiller = final, repair

    def repair_hook(self) -> Callable[[QuantPlan], tuple[ModelGraph, QuantPlan]]:
        def prepare(plan: QuantPlan) -> tuple[ModelGraph, QuantPlan]:
            res = self.repair_distiller(plan)
            return res.graph, res.plan

        return prepare

    def final(self, plan: QuantPlan) -> tuple[ModelGraph, QuantPlan, dict[str, Any]]:
        with DistillBar() as bar:
            self.final_distiller.progress = bar
            res = self.final_distiller(plan)
        _log_summary(res)
        return res.graph, res.plan, res.report


def make_distiller(target, ingested, table: CalibrationTable | None, samples: Sequence[Feed],
                   options: DistillOptions, device: str, threads: int | None, seed: int) -> DistillStage:
    run_plan = target_run_plan(target, table, device, threads, seed)
    opts = replace(options, threads=threads, seed=seed)
    final = Distiller(ingested.graph, samples, opts, ingested.torch_module, None, run_plan, table)
    if opts.mode == "e2e":
        repair = Distiller(ingested.graph, samples, replace(opts, mode="layer"), None, None, run_plan, table)
    else:
        repair = final
    return DistillStage(final, repair)


def mixed_shapes(samples: Sequence[Feed]) -> str:
    """'' if every sample has the same input shapes, else a short description of two that differ.

    Distillation stacks the captured activations of its samples, so they must share one shape.
    """
    first = {k: tuple(v.shape) for k, v in samples[0].items()} if samples else {}
    for f in samples[1:]:
        shapes = {k: tuple(v.shape) for k, v in f.items()}
        if shapes != first:
            name = next(k for k in first if first[k] != shapes.get(k))
            return (f"input {name!r} is {'x'.join(map(str, first[name]))} in one sample and "
                    f"{'x'.join(map(str, shapes.get(name, ())))} in another")
    return ""


def check_distill_inputs(ingested, options: DistillOptions, calib: Path | None) -> None:
    """Refuse what distillation cannot do before any slow stage runs."""
    if options.mode == "e2e" and ingested.torch_module is None:
        Distiller.check_teacher(ingested.graph, None)
    if calib is None or (Path(calib).is_file() and Path(calib).suffix.lower() == ".json"):
        raise InputError("--distill learns from sample data: pass --calib DATA (a folder or .npz of inputs)"
                         + ("" if calib is None else ", not only a calib.json"))


def sample_count(options: DistillOptions) -> int:
    """How many calibration samples the stage reads: the training cap plus the held-out share."""
    cap = BIAS_ONLY_SAMPLES if options.mode == "bias" else options.max_samples
    return int(cap / max(1e-6, 1 - options.holdout)) + 1


def _log_summary(res: DistillResult) -> None:
    r = res.report
    if not r.get("layers"):
        log.info("distillation: %s", r.get("why", "nothing to do"))
        return
    before, after = r["fidelity"]["before"], r["fidelity"]["after"]
    if res.fell_back:
        log.warning("distillation (%s) fell back to round-to-nearest: held-out error %.4g would have been %.4g",
                    r["mode"], before["nmse"], after["nmse"])
        return
    log.info("distillation (%s): %d layers, held-out output error %.4g -> %.4g (cosine %.5f -> %.5f) in %.1f s",
             r["mode"], len(r["layers"]), before["nmse"], after["nmse"], before["cosine"], after["cosine"], r["time_s"])
