"""Distillation: the FP32 model teaches its quantised plan (``dscompile.compiler.distill``).

    result = distill(graph, plan, samples, DistillOptions(mode="layer"))
    result.graph  # float weights on the learned grid points, corrected biases
    result.plan   # layers note what was reconstructed (extra["distill"])
    result.report # fidelity before/after on held-out samples, per-layer errors, time

Modes: ``bias`` (bias correction only, cheap), ``layer`` (AdaRound/LSQ layer-wise
reconstruction on any ONNX, plus bias correction), ``e2e`` (quantisation-aware
knowledge distillation for torch sources). Whatever the mode, the result is
compared with round-to-nearest on held-out samples and replaced by it when it
is worse: distillation never makes a model worse, and says so when it falls back.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from dscompile.calibration.table import CalibrationTable
from dscompile.compiler.adaround import RoundingOptions
from dscompile.compiler.distill_capture import output_error, run_outputs, student_model
from dscompile.compiler.distill_layers import LayerOptions, reconstruct
from dscompile.compiler.distill_ops import count_anchor_layers
from dscompile.compiler.distill_state import (
    PlannedLayer,
    annotate_plan,
    current_entries,
    planned_layers,
    shared_weights,
    small_constants,
    write_back,
)
from dscompile.compiler.graph import ModelGraph, macs
from dscompile.compiler.layers import find_layers
from dscompile.compiler.normalize import prepared
from dscompile.compiler.plan import QuantPlan, with_table_ranges
from dscompile.compiler.runtime import ort_session, ort_version, run_session
from dscompile.errors import InputError

log = logging.getLogger("dscompile")

Feed = dict[str, np.ndarray]
MODES = ("bias", "layer", "e2e")
MIN_SAMPLES = 32  # fewer calibration samples than this: reconstruction may overfit (warned)
DEFAULT_LAYER_STEPS = 1000
DEFAULT_E2E_STEPS = 2000
SMALL_MODEL_MACS = 50_000_000
CAPTURE_BUDGET_S = 120.0
# Wall time of the whole stage (held-out checks, capture, learning): with ingest, calibration and the
# final build and verification, a ResNet-18-sized model stays under 10 minutes on 2 cores.
DEFAULT_TIME_S = 300.0


@dataclass(frozen=True)
class DistillOptions:
    mode: str = "layer"
    steps: int | None = None  # layer: per layer; e2e: in total
    time_s: float | None = None  # wall time of the stage: checks, capture, learning (default DEFAULT_TIME_S)
    bias_correction: bool = True
    learn_activations: bool = False  # LSQ step sizes of layer inputs (always on in e2e)
    holdout: float = 0.25  # fraction of the samples kept out of learning, to check the result
    max_samples: int = 256
    memory_mb: float = 512.0
    batch: int = 32
    seed: int = 0
    threads: int | None = None
    temperature: float = 4.0  # e2e: softening of the outputs for the KL loss
    feature_loss: float = 0.0  # e2e: weight of the per-layer feature MSE
    lr_scale: float = 1.0  # multiplies every learning rate (a diverging run falls back by itself)


@dataclass(frozen=True)
class DistillResult:
    graph: ModelGraph
    plan: QuantPlan
    report: dict[str, Any] = field(default_factory=dict)
    fell_back: bool = False


Progress = Callable[[str, int, int, int, int, float], None]
# Builds a plan for the target and runs it: (graph, plan, feeds) -> (outputs per feed, "measured with ...").
RunPlan = Callable[[ModelGraph, QuantPlan, Sequence[Feed]], tuple[list[list[np.ndarray]], str]]


def distill(
    graph: ModelGraph, plan: QuantPlan, samples: Sequence[Feed], options: DistillOptions = DistillOptions(),
    torch_module: Any = None, progress: Progress | None = None, run_plan: RunPlan | None = None,
    table: CalibrationTable | None = None,
) -> DistillResult:
    """Distil ``plan``'s weight-quantised layers; see the module docstring."""
    return Distiller(graph, samples, options, torch_module, progress, run_plan, table)(plan)


class Distiller:
    """Distillation of one model on fixed samples, for any number of plans.

    Layer results are cached by (layer, precision, grids), so DMPQ's repair loop,
    which calls this for every round's plan (compiler/repair.py, through
    dscompile/planning.py's Evaluator), only learns the layers whose precision changed.
    """

    def __init__(self, graph: ModelGraph, samples: Sequence[Feed], options: DistillOptions = DistillOptions(),
                 torch_module: Any = None, progress: Progress | None = None, run_plan: RunPlan | None = None,
                 table: CalibrationTable | None = None) -> None:
        if options.mode not in MODES:
            raise InputError(f"--distill {options.mode!r}: expected one of {', '.join(MODES)}")
        if options.mode == "e2e":
            self.check_teacher(graph, torch_module)
        self.graph = prepared(graph)
        self.options, self.teacher, self.progress, self.run_plan = options, torch_module, progress, run_plan
        self.table = table  # ranges a plan leaves to the table (``build --plan``), as the lowering reads them
        if options.mode != "e2e":
            options = replace(options, max_samples=_affordable_samples(self.graph.model, samples, options))
        self.train, self.holdout = split_samples(samples, options)
        self.reference = run_outputs(self.graph.model, self.holdout, options.threads)
        self.cache: dict[tuple, tuple] = {}

    @staticmethod
    def check_teacher(graph: ModelGraph, torch_module: Any) -> None:
        if torch_module is None:
            raise InputError(
                f"--distill e2e needs the model's torch source (TorchScript .pt, torch.export .pt2 or a pickled "
                f"nn.Module) as the FP32 teacher; {graph.source.path} is ONNX-only: use --distill layer, "
                "which reconstructs layer by layer on any ONNX model"
            )

    def __call__(self, plan: QuantPlan, only: Sequence[str] | None = None) -> DistillResult:
        if self.table is not None:  # entry quantisers (and e2e's starting step sizes) from the table's ranges
            model = self.graph.model
            plan = with_table_ranges(plan, find_layers(self.graph), self.table, {o.name for o in model.graph.output},
                                     {t.name for t in model.graph.initializer})
        with torch_threads(self.options.threads, macs(self.graph.model)):
            return self._run(plan, only)

    def _run(self, plan: QuantPlan, only: Sequence[str] | None) -> DistillResult:
        start, options, model = time.perf_counter(), self.options, self.graph.model
        layers, skipped = planned_layers(model, plan)
        shared = shared_weights(layers)
        skipped += [f"{pl.plan.name}: its weight is shared with another layer" for pl in layers if pl.spec.weight in shared]
        layers = [pl for pl in layers if pl.spec.weight not in shared and (only is None or pl.plan.name in only)]
        if not layers:
            return DistillResult(self.graph, plan, {"mode": options.mode, "layers": [], "skipped": skipped,
                                                    "why": "no weight-quantised layer to distill"})
        t_check = time.perf_counter()
        before, where = self._error(self.graph, plan, layers)
        # what is left of the stage's budget once the check after learning (as long as this one) is set aside
        left = (options.time_s or DEFAULT_TIME_S) - (time.perf_counter() - start) - (time.perf_counter() - t_check)
        e2e_notes: dict[str, Any] = {}
        if options.mode == "e2e":
            from dscompile.compiler.qat import train_e2e

            e2e_notes = train_e2e(self.graph, layers, self.train, options, self.teacher, self.progress,
                                  budget_s=max(left, 1.0))
        else:
            reconstruct(model, layers, self.train, self.holdout, _layer_options(options), small_constants(model),
                        self.progress, left, self.cache)
        summary = {"mode": options.mode}
        new_graph, new_plan = write_back(self.graph, layers), annotate_plan(plan, layers, summary)
        after, _ = self._error(new_graph, new_plan, layers)
        fell_back = not after["nmse"] <= before["nmse"]  # NaN counts as worse
        if fell_back:
            log.warning("distillation did not beat round-to-nearest on %d held-out samples (error %.4g vs %.4g); "
                        "falling back to round-to-nearest", len(self.holdout), after["nmse"], before["nmse"])
            for pl in layers:
                pl.reset()
                pl.notes["fell_back"] = True
            new_graph, new_plan = self.graph, annotate_plan(plan, layers, summary)
        report = _report(options, layers, skipped, before, after, fell_back, len(self.train), len(self.holdout),
                         start, e2e_notes, where)
        summary.update(fell_back=fell_back, time_s=report["time_s"])
        return DistillResult(new_graph, new_plan, report, fell_back)

    def _error(self, graph: ModelGraph, plan: QuantPlan, layers: list[PlannedLayer]) -> tuple[dict[str, Any], str]:
        """Held-out error of ``plan`` on ``graph``'s weights: the target's own build when a runner was
        given, else the fake-quantised simulation."""
        if self.run_plan is not None:
            outs, where = self.run_plan(graph, plan, self.holdout)
            return output_error(self.reference, outs), where
        sim = student_model(graph.model, {}, current_entries(layers))
        where = (f"onnxruntime {ort_version()} CPU on a fake-quantised simulation of the plan "
                 f"(weights on the distilled grid)")
        if graph is self.graph:  # before: round-to-nearest weights
            sim = student_model(model_with_rtn(graph.model, layers), {}, _rtn_entries(layers))
        return output_error(self.reference, run_outputs(sim, self.holdout, self.options.threads)), where


@contextlib.contextmanager
def torch_threads(threads: int | None, model_macs: int):
    """Torch threads for learning: as asked, else one for small models, whose tiny kernels only
    lose time to thread hand-offs (tenfold on a busy machine)."""
    before = torch.get_num_threads()
    want = threads or (1 if model_macs < SMALL_MODEL_MACS else before)
    torch.set_num_threads(max(1, want))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _affordable_samples(model, samples: Sequence[Feed], options: DistillOptions) -> int:
    """Layer-wise capture runs the model twice per layer and sample: cap the samples so capture
    stays within CAPTURE_BUDGET_S (timed here on one sample), never below MIN_SAMPLES."""
    if not samples:
        return options.max_samples
    sess = ort_session(model, options.threads)
    run_session(sess, samples[0])
    t0 = time.perf_counter()
    run_session(sess, samples[0])
    per_sample = (time.perf_counter() - t0) * 2 * max(1, count_anchor_layers(model)) / (1 - options.holdout)
    cap = max(MIN_SAMPLES, int(CAPTURE_BUDGET_S / max(per_sample, 1e-9)))
    if cap < min(options.max_samples, len(samples)):
        log.info("distillation: capturing %d samples per layer (of %d) to keep capture near %.0f s", cap,
                 min(options.max_samples, len(samples)), CAPTURE_BUDGET_S)
        return cap
    return options.max_samples


def split_samples(samples: Sequence[Feed], options: DistillOptions) -> tuple[list[Feed], list[Feed]]:
    """(train, held-out): a seeded shuffle, capped at max_samples for training; warns when few."""
    n = len(samples)
    if n < 2:
        raise InputError(f"distillation needs calibration samples to learn from and check on; got {n} (give --calib DATA)")
    order = np.random.default_rng(options.seed).permutation(n)
    n_hold = min(max(1, int(round(n * options.holdout))), n - 1)
    hold = [samples[i] for i in order[:n_hold]]
    train = [samples[i] for i in order[n_hold:]][: options.max_samples]
    if len(train) < MIN_SAMPLES:
        log.warning("distillation is learning from only %d calibration samples (%d more held out to check it); "
                    "at least %d are recommended: the result may not generalise", len(train), n_hold, MIN_SAMPLES)
    return train, hold


def _layer_options(o: DistillOptions) -> LayerOptions:
    rounding = RoundingOptions(steps=o.steps or DEFAULT_LAYER_STEPS, batch=o.batch, seed=o.seed,
                               lr=RoundingOptions.lr * o.lr_scale, act_lr=RoundingOptions.act_lr * o.lr_scale)
    return LayerOptions(o.mode == "layer", o.bias_correction, o.learn_activations, rounding, o.memory_mb, o.threads)


def model_with_rtn(model, layers: list[PlannedLayer]):
    """The FP32 model with each planned layer's weight rounded to nearest (what the lowering does alone)."""
    return student_model(model, {pl.spec.weight: pl.w_rtn() for pl in layers}, ({}, {}))


def _rtn_entries(layers: list[PlannedLayer]):
    saved = [pl.act_now for pl in layers]
    for pl in layers:
        pl.act_now = pl.act
    try:
        return current_entries(layers)
    finally:
        for pl, a in zip(layers, saved, strict=True):
            pl.act_now = a


def _report(options, layers, skipped, rtn, after, fell_back, n_train, n_hold, start, e2e_notes, where) -> dict[str, Any]:
    where = f"{where}, {n_hold} held-out calibration samples"
    return {
        "mode": options.mode,
        "samples": {"train": n_train, "holdout": n_hold},
        "fidelity": {"measured_with": where, "before": _round(rtn), "after": _round(after)},
        "fell_back": fell_back,
        "why": ("the distilled model was worse than round-to-nearest on held-out samples; round-to-nearest kept"
                if fell_back else ""),
        "layers": [{"name": pl.plan.name, "precision": pl.plan.precision, "grid": pl.grid.describe(),
                    **{k: (round(v, 8) if isinstance(v, float) else v) for k, v in pl.notes.items()}} for pl in layers],
        "skipped": skipped,
        "time_s": round(time.perf_counter() - start, 2),
        "time_budget_s": options.time_s or DEFAULT_TIME_S,
        "out_of_time": [pl.plan.name for pl in layers if pl.notes.get("out_of_time")],
        "learning_s": round(sum(float(pl.notes.get("time_s", 0.0)) for pl in layers), 2),  # incl. cached rounds
        **({"e2e": e2e_notes} if e2e_notes else {}),
    }


def _round(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 8) if isinstance(v, float) else v) for k, v in d.items()}


def replace_options(options: DistillOptions, **changes: Any) -> DistillOptions:
    return replace(options, **changes)
