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

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from dscompile.compiler.adaround import RoundingOptions
from dscompile.compiler.distill_capture import output_error, run_outputs, student_model
from dscompile.compiler.distill_layers import LayerOptions, reconstruct
from dscompile.compiler.distill_state import (
    PlannedLayer,
    annotate_plan,
    current_entries,
    current_weights,
    planned_layers,
    shared_weights,
    small_constants,
    with_biases,
    write_back,
)
from dscompile.compiler.graph import ModelGraph
from dscompile.compiler.plan import QuantPlan
from dscompile.compiler.runtime import ort_version

from dscompile.errors import InputError

log = logging.getLogger("dscompile")

Feed = dict[str, np.ndarray]
MODES = ("bias", "layer", "e2e")
MIN_SAMPLES = 32  # fewer calibration samples than this: reconstruction may overfit (warned)
DEFAULT_LAYER_STEPS = 1000
DEFAULT_E2E_STEPS = 2000
DEFAULT_TIME_S = 300.0  # a ResNet-18-sized model stays under 10 minutes on 2 cores with capture and build


@dataclass(frozen=True)
class DistillOptions:
    mode: str = "layer"
    steps: int | None = None  # layer: per layer; e2e: in total
    time_s: float | None = None  # total time for learning (default DEFAULT_TIME_S)
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


@dataclass(frozen=True)
class DistillResult:
    graph: ModelGraph
    plan: QuantPlan
    report: dict[str, Any] = field(default_factory=dict)
    fell_back: bool = False


Progress = Callable[[str, int, int, int, int, float], None]


def distill(
    graph: ModelGraph, plan: QuantPlan, samples: Sequence[Feed], options: DistillOptions = DistillOptions(),
    torch_module: Any = None, progress: Progress | None = None, only: Sequence[str] | None = None,
) -> DistillResult:
    """Run distillation on ``plan``'s weight-quantised layers (or just the ``only`` named ones)."""
    if options.mode not in MODES:
        raise InputError(f"--distill {options.mode!r}: expected one of {', '.join(MODES)}")
    if options.mode == "e2e" and torch_module is None:
        raise InputError(
            f"--distill e2e needs the model's torch source (TorchScript .pt, torch.export .pt2 or a pickled "
            f"nn.Module) as the FP32 teacher; {graph.source.path} is ONNX-only: use --distill layer, "
            "which reconstructs layer by layer on any ONNX model"
        )
    start = time.perf_counter()
    layers, skipped = planned_layers(graph.model, plan)
    shared = shared_weights(layers)
    skipped += [f"{pl.plan.name}: its weight is shared with another layer" for pl in layers if pl.spec.weight in shared]
    layers = [pl for pl in layers if pl.spec.weight not in shared and (only is None or pl.plan.name in only)]
    if not layers:
        return DistillResult(graph, plan, {"mode": options.mode, "layers": [], "skipped": skipped,
                                           "why": "no weight-quantised layer to distill"})
    train, holdout = split_samples(samples, options)
    model = graph.model
    reference = run_outputs(model, holdout, options.threads)
    rtn = _sim_error(model, layers, holdout, reference, options)
    if options.mode == "e2e":
        from dscompile.compiler.qat import train_e2e

        e2e_notes = train_e2e(graph, layers, train, options, torch_module, progress)
    else:
        e2e_notes = {}
        reconstruct(model, layers, train, holdout, _layer_options(options), small_constants(model), progress,
                    options.time_s or DEFAULT_TIME_S)
    after = _sim_error(model, layers, holdout, reference, options)
    fell_back = after["nmse"] > rtn["nmse"]
    if fell_back:
        log.warning("distillation did not beat round-to-nearest on %d held-out samples (error %.4g vs %.4g); "
                    "falling back to round-to-nearest", len(holdout), after["nmse"], rtn["nmse"])
        for pl in layers:
            pl.reset()
            pl.notes["fell_back"] = True
    report = _report(options, layers, skipped, rtn, after, fell_back, len(train), len(holdout), start, e2e_notes)
    new_graph = graph if fell_back else write_back(graph, layers)
    new_plan = annotate_plan(plan, layers, {}, {k: report[k] for k in ("mode", "fell_back", "time_s")})
    return DistillResult(new_graph, new_plan, report, fell_back)


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
    rounding = RoundingOptions(steps=o.steps or DEFAULT_LAYER_STEPS, batch=o.batch, seed=o.seed)
    return LayerOptions(o.mode == "layer", o.bias_correction, o.learn_activations, rounding, o.memory_mb, o.threads)


def _sim_error(model, layers: list[PlannedLayer], holdout, reference, options: DistillOptions) -> dict[str, Any]:
    sim = student_model(with_biases(model, layers), current_weights(layers), current_entries(layers))
    return output_error(reference, run_outputs(sim, holdout, options.threads))


def _report(options, layers, skipped, rtn, after, fell_back, n_train, n_hold, start, e2e_notes) -> dict[str, Any]:
    where = (f"onnxruntime {ort_version()} CPU on a fake-quantised simulation of the plan, "
             f"{n_hold} held-out calibration samples")
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
        **({"e2e": e2e_notes} if e2e_notes else {}),
    }


def _round(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 8) if isinstance(v, float) else v) for k, v in d.items()}


def replace_options(options: DistillOptions, **changes: Any) -> DistillOptions:
    return replace(options, **changes)
