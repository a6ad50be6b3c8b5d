"""AdaRound (Nagel et al. 2020): learn whether each weight rounds up or down.

Each weight gets a soft rounding variable V; the layer uses
``s * clip(floor(w/s) + h(V), -qmax, qmax)`` with the rectified sigmoid
``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``. The loss is the
layer's output error against FP32 (relative MSE, after its activation) plus
``lam * sum(1 - |2h - 1|^beta)``, which is off for the first ``warmup`` of the
run and then, as beta anneals from 20 to 2, drives every h to 0 or 1. The
final weights round hard (h >= 0.5). The entry quantiser's step size can be
learned alongside (LSQ).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dscompile.compiler.distill_data import LayerData
from dscompile.compiler.distill_ops import LayerModel
from dscompile.compiler.distill_quant import ActGrid, ActQuant

ZETA, GAMMA = 1.1, -0.1

Progress = Callable[[int, int, float], None]  # (step, steps, loss)


@dataclass(frozen=True)
class RoundingOptions:
    steps: int = 1000
    time_s: float | None = None  # stop annealing early (schedule follows elapsed time) past this
    batch: int = 32
    lr: float = 1e-2
    act_lr: float = 1e-3
    reg: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    seed: int = 0


@dataclass
class RoundingResult:
    q: np.ndarray  # learned integer weights
    act: ActGrid | None  # the entry quantiser after learning (unchanged unless learned)
    steps: int
    final_loss: float
    diverged: bool  # a NaN/inf loss stopped the run; the last finite state was kept


class SoftRounding(torch.nn.Module):
    """Codes ``floor(w/s) + zp + h(alpha)`` clipped to the grid's range; value ``(code - zp) * s``."""

    def __init__(self, w: np.ndarray, scale_full: np.ndarray, zp_full: np.ndarray, qrange: tuple[int, int]) -> None:
        super().__init__()
        ws = w.astype(np.float64) / scale_full
        self.register_buffer("floor", torch.from_numpy((np.floor(ws) + zp_full).astype(np.float32)))
        self.register_buffer("scale", torch.from_numpy(scale_full.astype(np.float32)))
        self.register_buffer("zp", torch.from_numpy(zp_full.astype(np.float32)))
        rest = np.clip(ws - np.floor(ws), 0.0, 1.0)
        self.alpha = torch.nn.Parameter(torch.from_numpy(-np.log((ZETA - GAMMA) / (rest - GAMMA) - 1).astype(np.float32)))
        self.qrange = qrange

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def q(self, hard: bool) -> torch.Tensor:
        up = (self.alpha >= 0).float() if hard else self.h()  # h >= 0.5  <=>  alpha >= 0
        return torch.clamp(self.floor + up, *self.qrange)

    def forward(self, hard: bool = False) -> torch.Tensor:
        return (self.q(hard) - self.zp) * self.scale

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).mean()


def learn_rounding(
    layer: LayerModel, data: LayerData, w: np.ndarray, scale_full: np.ndarray, zp_full: np.ndarray,
    qrange: tuple[int, int], b: np.ndarray | None, act: ActGrid | None, learn_act: bool, opts: RoundingOptions,
    progress: Progress | None = None,
) -> RoundingResult:
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    soft = SoftRounding(w, scale_full, zp_full, qrange)
    quant = ActQuant(act, learn_act) if act is not None else None
    bias = torch.from_numpy(b.astype(np.float32)) if b is not None else None
    groups = [{"params": [soft.alpha], "lr": opts.lr}]
    if quant is not None and learn_act:
        groups.append({"params": [quant.log_scale], "lr": opts.act_lr})
    opt = torch.optim.Adam(groups)
    denom = _target_power(layer, data)
    start, step, loss_v, diverged = time.perf_counter(), 0, float("nan"), False
    last_good = [p.detach().clone() for g in groups for p in g["params"]]
    while step < opts.steps:
        frac = _progress(step, opts, start)
        if frac >= 1.0:
            break
        x, y, padded = data.batch(rng, opts.batch, tuple(w.shape))
        xq = quant(x) if quant is not None else x
        out = layer.post(layer.pre(xq, soft(), bias, padded))
        rec = (out - layer.post(y)).pow(2).mean() / denom
        loss = rec
        if frac > opts.warmup:
            beta = opts.beta[1] + (opts.beta[0] - opts.beta[1]) * (1 - (frac - opts.warmup) / (1 - opts.warmup))
            loss = rec + opts.reg * soft.regulariser(beta)
        if not torch.isfinite(loss):
            diverged = True
            with torch.no_grad():
                for p, keep in zip((p for g in groups for p in g["params"]), last_good, strict=True):
                    p.copy_(keep)
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        loss_v = float(rec.item())
        if step % 25 == 0:
            last_good = [p.detach().clone() for g in groups for p in g["params"]]
            if progress:
                progress(step, opts.steps, loss_v)
    q = soft.q(hard=True).detach().numpy().astype(np.int32)
    return RoundingResult(q, quant.learned() if quant is not None else None, step, loss_v, diverged)


def _progress(step: int, opts: RoundingOptions, start: float) -> float:
    """Fraction of the schedule done: by steps, or by time when a time share is set."""
    frac = step / max(opts.steps, 1)
    if opts.time_s:
        frac = max(frac, (time.perf_counter() - start) / opts.time_s)
    return frac


@torch.no_grad()
def _target_power(layer: LayerModel, data: LayerData) -> float:
    """Mean square of the FP32 target (after activation): the relative-error denominator."""
    total, n = 0.0, 0
    for _, y in data.chunks(256):
        t = layer.post(y)
        total += float(t.double().pow(2).sum())
        n += t.numel()
    return max(total / max(n, 1), 1e-12) if n else 1.0


@torch.no_grad()
def layer_error(layer: LayerModel, data: LayerData, wq: torch.Tensor, b: torch.Tensor | None, quant_in) -> float:
    """Relative MSE of the layer's (post-activation) output on whole samples."""
    num = den = 0.0
    for x, y in data.chunks():
        t = layer.post(y)
        out = layer.post(layer.pre(quant_in(x), wq, b))
        num += float((out - t).double().pow(2).sum())
        den += float(t.double().pow(2).sum())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)
