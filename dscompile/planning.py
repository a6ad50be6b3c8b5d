"""The plan stage: capabilities -> DMPQ plan -> repair on held-out data; and plan loading for builds.

Called by the pipeline (compile) and by the ``plan`` / ``build`` commands.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dscompile.calibration.table import CalibrationTable
from dscompile.compiler.allocate import Budget
from dscompile.compiler.dmpq import DEFAULT_BUDGET, PlanOptions, make_plan
from dscompile.compiler.graph import ModelGraph
from dscompile.compiler.layers import find_layers
from dscompile.compiler.normalize import prepared
from dscompile.compiler.plan import QuantPlan, plan_ranges, validate_layers, validate_plan
from dscompile.compiler.repair import DEFAULT_GOAL, DEFAULT_ROUNDS, FidelityGoal, repair
from dscompile.compiler.verify import Fidelity, compare
from dscompile.errors import InputError
from dscompile.profiles.runners import OrtRunner
from dscompile.targets.base import BuildOptions, Target

log = logging.getLogger("dscompile")
Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class PlanSettings:
    budget: Budget = DEFAULT_BUDGET
    min_fidelity: FidelityGoal | None = DEFAULT_GOAL
    rounds: int = DEFAULT_ROUNDS
    sensitivity_samples: int = 16
    threads: int | None = None
    seed: int = 0
    show_progress: bool = True



def check_numeric_outputs(graph: ModelGraph) -> None:
    bad = [o for o in graph.outputs if not o.dtype.startswith("float")]
    if bad:
        raise InputError(
            f"model output {bad[0].name!r} is {bad[0].dtype}, not a number DMPQ can compare: quantised "
            "planning needs float outputs (scores, embeddings, maps)"
        )


def plan_for(
    target: Target, graph: ModelGraph, device: str, table: CalibrationTable | None,
    feeds: Sequence[Feed], holdout: Sequence[Feed], settings: PlanSettings,
    prepare: Callable[[QuantPlan], tuple[ModelGraph, QuantPlan]] | None = None,
) -> tuple[QuantPlan, Fidelity | None]:
    """A DMPQ plan, repaired on ``holdout`` until ``settings.min_fidelity`` holds (when given).

    ``prepare`` (distillation, dscompile/distilling.py) turns each round's plan into the weights the
    build will use, so the repair loop measures reconstructed layers before it promotes any.
    """
    check_numeric_outputs(graph)
    if not feeds:
        raise InputError("planning needs calibration samples (--calib DATA)")
    g = prepared(graph)
    caps = _capabilities(target, g, device, settings.threads)
    # distillation (``prepare``) sets the weights itself: then neither the builds nor the sensitivity use GPTQ
    options = PlanOptions(settings.budget, settings.sensitivity_samples, settings.threads, settings.show_progress,
                          fit_weights=prepare is None)
    plan = make_plan(g, caps, table, feeds, options, model_sha256=graph.sha256)
    refine = getattr(target, "refine_plan", None)  # a target's own measurement of the plan (ort-cpu: weight bits)
    if refine is not None:
        plan = refine(g, plan, table, feeds, settings.threads)
    if not holdout:
        return plan, None
    evaluate = Evaluator(target, graph, table, holdout, device, settings, prepare, tuple(feeds))
    return repair(plan, evaluate, settings.min_fidelity, settings.rounds)


def _capabilities(target: Target, graph: ModelGraph, device: str, threads: int | None):
    try:
        return target.capabilities(graph, device, threads=threads)  # type: ignore[call-arg]
    except TypeError:
        return target.capabilities(graph, device)


class Evaluator:
    """Builds a plan with the target into a scratch folder and measures it on held-out feeds."""

    def __init__(self, target: Target, graph: ModelGraph, table: CalibrationTable | None, holdout: Sequence[Feed],
                 device: str, settings: PlanSettings,
                 prepare: Callable[[QuantPlan], tuple[ModelGraph, QuantPlan]] | None = None,
                 samples: tuple[Feed, ...] = ()) -> None:
        self.target, self.graph, self.table, self.holdout = target, graph, table, list(holdout)
        self.samples = samples  # calibration feeds: the same ones the final build gets
        self.prepare = prepare
        self.device, self.settings = device, settings
        self.reference = OrtRunner(graph.model, settings.threads)
        self._ref_out = [self.reference.run(f) for f in self.holdout]

    def __call__(self, plan: QuantPlan) -> Fidelity:
        stage = Path(tempfile.mkdtemp(prefix="dscompile-repair-"))
        try:
            build = BuildOptions(self.settings.seed, self.settings.threads, self.device, samples=self.samples,
                                 refit_weights=self.prepare is None)
            graph = self.graph
            if self.prepare is not None:
                graph, plan = self.prepare(plan)
            artifact = self.target.lower(graph, plan, self.table, stage, build)
            runner = self.target.runner(artifact, self.settings.threads)
            if runner is None:
                raise InputError(f"target {self.target.name} has no runtime here to repair the plan with")
            outs = iter(self._ref_out)
            goal = self.settings.min_fidelity
            return compare(lambda f: next(outs), runner.run, self.holdout, runner.where(), goal.user if goal else None)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def load_plan(path: str | Path, target: Target, graph: ModelGraph, device: str, table: CalibrationTable | None,
              force: bool = False) -> QuantPlan:
    """A plan file checked against this model and target: hand edits honoured or rejected with the reason."""
    plan = QuantPlan.load(path)
    g = prepared(graph)
    caps = _capabilities(target, g, device, None)
    validate_plan(plan, graph.sha256, {n.name for n in g.model.graph.node}, caps, force)
    layers = find_layers(g)
    validate_layers(plan, layers, caps)
    outs = {o.name for o in g.model.graph.output}
    plan_ranges(plan, layers, table, outs, {t.name for t in g.model.graph.initializer})  # every range resolvable
    return replace(plan, device=device or plan.device)


def calibration_tensors(graph: ModelGraph) -> list[str]:
    """Tensors DMPQ may quantise statically (layer inputs and outputs), plus the calibrator's own choice."""
    from dscompile.calibration.collect import quantizable_tensors
    from dscompile.compiler.plan import needed_tensors

    g = prepared(graph)
    outs = {o.name for o in g.model.graph.output}
    consts = {t.name for t in g.model.graph.initializer}
    produced = {o for n in g.model.graph.node for o in n.output} | {i.name for i in g.model.graph.input}
    mine = [t for lay in find_layers(g) for t in needed_tensors(lay, outs) if t not in consts and t in produced]
    return list(dict.fromkeys([*quantizable_tensors(graph.model), *mine]))


PLOT_FILES = ("sensitivity.png", "allocation.png")


def check_plots_writable(folder: str | Path | None, force: bool) -> None:
    """Refuse existing plots (without --force) before any work is done."""
    if folder is None:
        return
    from dscompile.errors import OutputError
    from dscompile.fileio import check_writable

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--plots {folder}: exists and is not a folder")
    if folder.is_dir():
        for name in PLOT_FILES:
            check_writable(folder / name, force)


def write_plan_plots(plan: QuantPlan, folder: str | Path, force: bool = False) -> list[Path]:
    """``sensitivity.png`` and ``allocation.png`` in ``folder`` (created if missing)."""
    from dscompile.compiler.plan_plots import allocation_png, sensitivity_png
    from dscompile.fileio import write_bytes

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from dscompile.errors import OutputError

        raise OutputError(f"{folder}: cannot create the plots folder ({exc.strerror})") from None
    written = []
    for name, render in (("sensitivity.png", sensitivity_png), ("allocation.png", allocation_png)):
        written.append(write_bytes(folder / name, render(plan), force))
    return written
