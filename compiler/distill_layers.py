"""Layer-wise reconstruction (any ONNX source), one layer at a time in graph order.

For each planned layer: capture the student's input to it (every earlier layer
already reconstructed and fake-quantised) and the FP32 model's pre-activation
output, on sub-sampled calibration samples; learn the rounding (AdaRound, from
MSE-searched scales) and optionally the entry step size (LSQ); correct the bias.
Among round-to-nearest, round-to-nearest + bias correction and the learned
rounding, keep whichever has the lowest output error on held-out samples, so a
layer never ends up worse than round-to-nearest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import torch

from dscompile.compiler.adaround import RoundingOptions, layer_error, learn_rounding
from dscompile.compiler.bias_correction import corrected_bias, output_shift
from dscompile.compiler.distill_capture import Capturer, student_model
from dscompile.compiler.distill_data import LayerData, samples_within
from dscompile.compiler.distill_ops import LayerModel
from dscompile.compiler.distill_quant import ActQuant, dequantize, keep_extremes, mse_params
from dscompile.compiler.distill_state import (
    PlannedLayer,
    current_entries,
    current_weights,
    with_biases,
)

log = logging.getLogger("dscompile")

Feed = dict[str, np.ndarray]
MIN_HELD = 8  # held-out samples per layer at least, to choose between rounding candidates
LayerProgress = Callable[[str, int, int, int, int, float], None]  # (layer, index, count, step, steps, loss)


@dataclass(frozen=True)
class LayerOptions:
    reconstruct: bool = True  # False: bias correction only
    bias_correction: bool = True
    learn_activations: bool = False
    rounding: RoundingOptions = RoundingOptions()
    memory_mb: float = 512.0  # captured activations per layer (student input + FP32 output)
    threads: int | None = None


def reconstruct(
    model: onnx.ModelProto, layers: list[PlannedLayer], train: Sequence[Feed], holdout: Sequence[Feed],
    opts: LayerOptions, consts: dict[str, np.ndarray], progress: LayerProgress | None = None,
    time_budget: float | None = None, cache: dict | None = None,
) -> None:
    """Update each PlannedLayer's current choice (q, scales, bias, entry grid) in place.

    ``cache`` maps (layer, precision, grids, mode) to an earlier result for the same layer, reused as is.
    """
    cache = {} if cache is None else cache
    start = time.perf_counter()
    late: list[str] = []
    for i, pl in enumerate(layers):
        key = (pl.plan.name, pl.plan.precision, pl.grid, pl.act, opts.reconstruct, opts.bias_correction,
               opts.learn_activations)
        if key in cache:
            pl.q, pl.q_scales, pl.q_zps, pl.b_now, pl.act_now, pl.notes = cache[key]
            continue
        share = None
        if time_budget is not None:
            left = time_budget - (time.perf_counter() - start)
            if left <= 0:  # capture alone would overrun the budget: this layer stays round-to-nearest
                pl.notes = {"method": "rtn", "out_of_time": True,
                            "why": "the distillation time budget (--distill-time) ran out before this layer"}
                late.append(pl.plan.name)
                continue
            share = max(left / (len(layers) - i), 0.05)
        fp32 = Capturer(model, [pl.spec.x, pl.spec.pre], opts.threads, truncate=True)
        _one_layer(model, layers, pl, fp32, train, holdout, opts, consts, share,
                   (lambda s, n, loss, _i=i, _pl=pl: progress(_pl.plan.name, _i, len(layers), s, n, loss)) if progress else None)
        cache[key] = (pl.q, pl.q_scales, pl.q_zps, pl.b_now, pl.act_now, pl.notes)
    if late:
        log.warning("distillation: the time budget (--distill-time) ran out; %d of %d layers stay round-to-nearest "
                    "(%s); give more time or fewer --distill-samples", len(late), len(layers),
                    ", ".join(late[:3]) + (", ..." if len(late) > 3 else ""))


def _one_layer(model, layers, pl: PlannedLayer, fp32: Capturer, train, holdout, opts: LayerOptions, consts,
               share: float | None, progress) -> None:
    t0 = time.perf_counter()
    student = Capturer(student_model(with_biases(model, layers), current_weights(layers), current_entries(layers)),
                       [pl.spec.x], opts.threads, truncate=True)
    per_sample = _bytes_per_sample(fp32, pl, train[:1])
    n_train = samples_within(per_sample, opts.memory_mb * 0.75, len(train))
    # held-out samples in proportion to the training ones (a quarter of all), as capture sizing assumes:
    # when big models learn from fewer samples, capturing every held-out one would triple capture time
    n_hold = min(samples_within(per_sample, opts.memory_mb * 0.25, len(holdout)), max(MIN_HELD, n_train // 3))
    fit = _layer_data(pl, student, fp32, train[:n_train])
    held = _layer_data(pl, student, fp32, holdout[:n_hold])
    layer = LayerModel(pl.spec, consts)
    quant_in = ActQuant(pl.act).eval() if pl.act is not None else (lambda t: t)
    b0 = _t(pl.b)
    w_rtn = torch.from_numpy(pl.w_rtn())
    candidates = {"rtn": (pl.q, pl.scales, pl.zps, pl.b, pl.act, layer_error(layer, held, w_rtn, b0, quant_in))}
    if opts.bias_correction and _can_correct(pl):
        b_bc = corrected_bias(pl.b, output_shift(layer, fit, w_rtn, b0, quant_in))
        candidates["rtn+bc"] = (pl.q, pl.scales, pl.zps, b_bc, pl.act, layer_error(layer, held, w_rtn, _t(b_bc), quant_in))
    notes = {"samples": n_train, "holdout_samples": n_hold}
    if opts.reconstruct:
        notes.update(_learn(pl, layer, fit, held, opts, share, progress, candidates))
    best = min(candidates, key=lambda k: candidates[k][-1])
    pl.q, pl.q_scales, pl.q_zps, pl.b_now, pl.act_now, err = candidates[best]
    notes.update({
        "method": best, "error_before": candidates["rtn"][-1], "error_after": err,
        "time_s": round(time.perf_counter() - t0, 3),
    })
    if opts.reconstruct and best != "adaround" and "adaround" in candidates:
        notes["why"] = f"learned rounding was not better on held-out samples; kept {best}"
    pl.notes = notes
    log.debug("distill %s: %s error %.3g -> %.3g", pl.plan.name, best, notes["error_before"], err)


def _learn(pl: PlannedLayer, layer: LayerModel, fit: LayerData, held: LayerData, opts: LayerOptions,
           share: float | None, progress, candidates: dict) -> dict:
    scales, zps = mse_params(pl.w, pl.ids, pl.grid)
    ropts = replace(opts.rounding, time_s=share) if share else opts.rounding
    res = learn_rounding(layer, fit, pl.w, scales[pl.ids], zps[pl.ids], pl.grid.qrange, pl.b, pl.act,
                         opts.learn_activations and pl.act is not None and not pl.act.dynamic, ropts, progress)
    q = keep_extremes(res.q, pl.w, scales, zps, pl.ids, pl.grid)
    wq = torch.from_numpy(dequantize(q, scales, zps, pl.ids))
    quant_l = ActQuant(res.act).eval() if res.act is not None else (lambda t: t)
    b = pl.b
    if opts.bias_correction and _can_correct(pl):
        b = corrected_bias(pl.b, output_shift(layer, fit, wq, _t(pl.b), quant_l))
    candidates["adaround"] = (q, scales, zps, b, res.act, layer_error(layer, held, wq, _t(b), quant_l))
    notes = {"steps": res.steps, "train_loss": res.final_loss}
    if res.diverged:
        notes["diverged"] = "loss became NaN/inf; stopped and kept the last finite state"
        log.warning("distill %s: the loss diverged (NaN) after %d steps; stopped and kept the last finite state",
                    pl.plan.name, res.steps)
    return notes


def _can_correct(pl: PlannedLayer) -> bool:
    return pl.spec.bias is not None or pl.spec.op.op in ("Conv", "Gemm")


def _t(a: np.ndarray | None) -> torch.Tensor | None:
    return torch.from_numpy(np.array(a, np.float32)) if a is not None else None


def _bytes_per_sample(fp32: Capturer, pl: PlannedLayer, probe: Sequence[Feed]) -> int:
    got = fp32.run(probe, [pl.spec.x, pl.spec.pre])
    return max(1, sum(a.nbytes for a in got.values()) // max(len(probe), 1))


def _layer_data(pl: PlannedLayer, student: Capturer, fp32: Capturer, feeds: Sequence[Feed]) -> LayerData:
    x = student.run(feeds, [pl.spec.x])[pl.spec.x]
    y = fp32.run(feeds, [pl.spec.pre])[pl.spec.pre]
    return LayerData(pl.spec, torch.from_numpy(x), torch.from_numpy(y))
