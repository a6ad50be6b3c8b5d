"""End-to-end knowledge distillation (``--distill e2e``): quantisation-aware training of the
planned model against its FP32 torch source, on unlabeled calibration samples.

The student is the exported graph run in torch (compiler/distill_torchgraph.py)
with fake-quant following the plan: every weight-quantised layer's weight is a
latent float tensor fake-quantised on its grid with a learned per-group step
size (LSQ, straight-through rounding), its input is fake-quantised with a
learned step size, and its bias is trainable. The teacher is the FP32 torch
module; the loss is the KL divergence between temperature-softened outputs
(for outputs that look like class scores) plus each output's normalised MSE, plus an optional MSE on
every quantised layer's output against the FP32 graph. A NaN loss stops the run
and the best state so far is kept.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dscompile.compiler.distill_quant import (
    ActQuant,
    fake_quant,
    grad_scaled,
    keep_extremes,
    mse_params,
)
from dscompile.compiler.distill_state import PlannedLayer
from dscompile.compiler.distill_torchgraph import TorchGraph
from dscompile.compiler.graph import ModelGraph
from dscompile.compiler.ingest import flatten_outputs
from dscompile.compiler.verify import looks_like_scores
from dscompile.errors import InputError

log = logging.getLogger("dscompile")

Feed = dict[str, np.ndarray]
LR_WEIGHT, LR_SCALE, LR_BIAS = 1e-4, 1e-3, 1e-4
BATCH = 8


class FakeQuantLayer(torch.nn.Module):
    """A planned layer's trainable state: latent weight, LSQ weight steps, bias, entry quantiser."""

    def __init__(self, pl: PlannedLayer) -> None:
        super().__init__()
        self.pl = pl
        scales, zps = mse_params(pl.w, pl.ids, pl.grid)
        self.latent = torch.nn.Parameter(torch.from_numpy(pl.w.copy()))
        self.log_scale = torch.nn.Parameter(torch.from_numpy(np.log(scales).astype(np.float32)),
                                            requires_grad=pl.grid.symmetric)
        self.register_buffer("ids", torch.from_numpy(pl.ids))
        self.register_buffer("zps", torch.from_numpy(zps.astype(np.float32)))
        self.counts = np.bincount(pl.ids.ravel(), minlength=scales.size)
        b = pl.b if pl.b is not None else (np.zeros(pl.w.shape[pl.grid.axis], np.float32)
                                           if pl.spec.op.op in ("Conv", "Gemm") and pl.grid.axis is not None else None)
        self.bias = torch.nn.Parameter(torch.from_numpy(np.asarray(b, np.float32).copy())) if b is not None else None
        self.entry = ActQuant(pl.act, learn=not pl.act.dynamic) if pl.act is not None else None

    def weight(self) -> torch.Tensor:
        lo, hi = self.pl.grid.qrange
        scale = torch.exp(self.log_scale)
        if self.log_scale.requires_grad:
            scale = grad_scaled(scale, 1.0 / math.sqrt(float(self.counts.mean()) * hi))
        return fake_quant(self.latent, scale[self.ids], self.zps[self.ids], lo, hi)

    @torch.no_grad()
    def project(self) -> None:
        """Keep each step no larger than group absmax / qmax, so the group's largest weight sits on
        +-qmax and the lowering recomputes the same scale from the written weights."""
        if not self.log_scale.requires_grad:
            return
        amax = torch.zeros(self.log_scale.shape[0], dtype=torch.float32)
        amax.scatter_reduce_(0, self.ids.reshape(-1), self.latent.abs().reshape(-1), "amax")
        cap = torch.log(torch.clamp(amax / self.pl.grid.qmax, min=1e-12))
        self.log_scale.copy_(torch.minimum(self.log_scale, cap))

    def export(self) -> None:
        """Hard codes, steps and bias back into the PlannedLayer."""
        pl, grid = self.pl, self.pl.grid
        w = self.latent.detach().numpy().astype(np.float32)
        scales = torch.exp(self.log_scale).detach().double().numpy()
        zps = self.zps.double().numpy()
        q = np.clip(np.rint(w / scales[pl.ids]) + zps[pl.ids], *grid.qrange).astype(np.int32)
        pl.q, pl.q_scales, pl.q_zps = keep_extremes(q, w, scales, zps, pl.ids, grid), scales, zps
        if self.bias is not None:
            pl.b_now = self.bias.detach().numpy().reshape(pl.b.shape if pl.b is not None else -1).astype(np.float32)
        if self.entry is not None:
            pl.act_now = self.entry.learned()


def train_e2e(graph: ModelGraph, layers: list[PlannedLayer], train: Sequence[Feed], options: Any,
              teacher: Any, progress: Callable | None = None, budget_s: float | None = None) -> dict[str, Any]:
    """Train for at most ``budget_s`` seconds of wall time (default ``options.time_s``, else 300), the
    teacher's outputs included; write the best state into ``layers``; return notes for the report."""
    begin = time.perf_counter()
    torch.manual_seed(options.seed)
    student = TorchGraph(graph.model)
    fq = [FakeQuantLayer(pl) for pl in layers]
    shared: dict[str, ActQuant] = {}
    for m in fq:  # one quantiser per tensor, as the lowering puts one Q/DQ pair on it
        if m.entry is not None and not m.entry.grid.dynamic:
            m.entry = shared.setdefault(m.pl.spec.x, m.entry)
    for m in fq:
        student.weight_fn[m.pl.spec.weight] = m.weight
        if m.bias is not None:
            student.weight_fn[m.pl.bias_name or f"{m.pl.spec.weight}__distill_bias"] = lambda m=m: m.bias
        if m.entry is not None:
            student.entry_fn[m.pl.spec.anchor.name] = m.entry
    if any(m.bias is not None and m.pl.spec.bias is None for m in fq):
        _attach_new_biases(student, fq)
    targets = _teacher_outputs(teacher, graph, train)
    features = _fp32_features(graph, fq, train) if options.feature_loss > 0 else None
    opt = torch.optim.Adam(_param_groups(fq, options.lr_scale))
    steps = options.steps or 2000
    budget = (budget_s or options.time_s or 300.0) - (time.perf_counter() - begin)
    rng = np.random.default_rng(options.seed)
    start, best_loss, avg, step, diverged = time.perf_counter(), math.inf, None, 0, False
    best = copy.deepcopy([m.state_dict() for m in fq])  # the starting point is the fallback
    while step < steps and time.perf_counter() - start < budget:
        idx = rng.integers(0, len(train), min(BATCH, len(train)))
        opt.zero_grad()
        loss_v = 0.0
        for i in idx:
            loss = _sample_loss(student, fq, train[i], targets[i], features[i] if features else None, options) / len(idx)
            if not torch.isfinite(loss):
                diverged = True
                break
            loss.backward()
            loss_v += float(loss.item())
        if diverged:
            log.warning("end-to-end distillation: the loss became NaN/inf at step %d; stopped and kept the best state "
                        "(step loss %.4g)", step, best_loss)
            break
        opt.step()
        for m in fq:
            m.project()
        step += 1
        avg = loss_v if avg is None else 0.9 * avg + 0.1 * loss_v
        if avg < best_loss and step % 10 == 0:
            best_loss, best = avg, copy.deepcopy([m.state_dict() for m in fq])
        if progress and step % 10 == 0:
            progress("e2e", 0, 1, step, steps, avg)
    for m, state in zip(fq, best, strict=True):
        m.load_state_dict(state)
    for m in fq:
        m.export()
    return {"steps": step, "best_loss": None if math.isinf(best_loss) else round(best_loss, 8), "diverged": diverged,
            "temperature": options.temperature, "feature_loss": options.feature_loss,
            "time_s": round(time.perf_counter() - start, 2), "samples": len(train)}


def _attach_new_biases(student: TorchGraph, fq: list[FakeQuantLayer]) -> None:
    """Conv/Gemm layers without a bias get one (bias correction's place to land), read as input 2."""
    for node in student.nodes:
        for m in fq:
            if node.name == m.pl.spec.anchor.name and m.bias is not None and m.pl.spec.bias is None:
                name = f"{m.pl.spec.weight}__distill_bias"
                while len(node.input) < 3:
                    node.input.append("")
                node.input[2] = name


def _param_groups(fq: list[FakeQuantLayer], k: float) -> list[dict]:
    groups = [{"params": [m.latent for m in fq], "lr": LR_WEIGHT * k},
              {"params": [m.log_scale for m in fq if m.log_scale.requires_grad], "lr": LR_SCALE * k},
              {"params": [m.bias for m in fq if m.bias is not None], "lr": LR_BIAS * k},
              {"params": [m.entry.log_scale for m in fq if m.entry is not None and m.entry.log_scale.requires_grad],
               "lr": LR_SCALE * k}]
    for g in groups:  # a shared entry quantiser appears once
        g["params"] = list({id(p): p for p in g["params"]}.values())
    return [g for g in groups if g["params"]]


def _tensors(feed: Feed) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}


@torch.no_grad()
def _teacher_outputs(teacher: Any, graph: ModelGraph, feeds: Sequence[Feed]) -> list[list[torch.Tensor]]:
    call = teacher.module() if isinstance(teacher, torch.export.ExportedProgram) else teacher
    if hasattr(call, "eval"):
        call.eval()
    out = []
    for feed in feeds:
        try:
            got = call(*[torch.from_numpy(feed[s.name]) for s in graph.inputs])
        except Exception as exc:
            raise InputError(f"the torch teacher failed on a calibration sample: {str(exc).splitlines()[0][:200]}") from None
        out.append([t.detach().float() for t in flatten_outputs(got)])
    return out


@torch.no_grad()
def _fp32_features(graph: ModelGraph, fq: list[FakeQuantLayer], feeds: Sequence[Feed]) -> list[dict[str, torch.Tensor]]:
    ref = TorchGraph(graph.model)
    keep = tuple(m.pl.spec.y for m in fq)
    return [ref(_tensors(f), keep)[1] for f in feeds]


def _sample_loss(student: TorchGraph, fq, feed: Feed, target: list[torch.Tensor], feats, options) -> torch.Tensor:
    keep = tuple(m.pl.spec.y for m in fq) if feats is not None else ()
    outs, kept = student(_tensors(feed), keep)
    loss = torch.zeros(())
    for s, t in zip(outs, target, strict=False):
        s = s.reshape(t.shape)
        if looks_like_scores(t.numpy()):  # class scores: match the softened distribution
            temp = options.temperature
            loss = loss + F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), reduction="batchmean",
                                   log_target=True) * temp * temp
        # every output (regressions too): match the values, relative to their size
        loss = loss + (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
    if feats is not None:
        for name, value in kept.items():
            ref = feats[name]
            loss = loss + options.feature_loss * (value - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(1e-12)
    return loss
