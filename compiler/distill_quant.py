"""Quantisation grids for distillation: weight groups, scales, fake-quant with learned step sizes.

A weight grid is what the lowering (compiler/qdq.py) computes from the float
weights it is handed: symmetric narrow-range (q in [-qmax, qmax], scale = group
absmax / qmax) or, for int4 blocks, asymmetric (codes 0..15, scale and zero
point from the group's range). Weights written back on the grid, with each
group's extreme elements kept on their end codes, give the lowering the same
scales, so its round-to-nearest reproduces the learned codes bit for bit.
Groups are one per tensor, one per channel along ``axis``, or blocks of
``block_size`` along ``block_axis`` (every other index its own group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dscompile.compiler.capabilities import INT4_WEIGHT, INT8, INT8_DYNAMIC, INT16X8, WEIGHT_BITS
from dscompile.compiler.qdq import affine_params
from dscompile.compiler.ranges import range_from_json


@dataclass(frozen=True)
class WeightGrid:
    bits: int
    axis: int | None = None  # channel axis; None: one scale for the tensor
    block_axis: int | None = None  # block-wise: blocks of block_size along this axis
    block_size: int = 0
    symmetric: bool = True  # False: unsigned codes with a zero point per group (MatMulNBits' default)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qrange(self) -> tuple[int, int]:
        return (-self.qmax, self.qmax) if self.symmetric else (0, 2 ** self.bits - 1)

    def describe(self) -> str:
        kind = "" if self.symmetric else " asymmetric"
        if self.block_axis is not None:
            return f"int{self.bits}{kind} blocks of {self.block_size} along axis {self.block_axis}"
        if self.axis is not None:
            return f"int{self.bits}{kind} per-channel (axis {self.axis})"
        return f"int{self.bits}{kind} per-tensor"


@dataclass(frozen=True)
class ActGrid:
    """Activation quantiser at a layer's entry: ``scale`` and integer range; zero point for uint8."""

    bits: int
    scale: float
    zero_point: int = 0
    qmin: int = -128
    qmax: int = 127
    dynamic: bool = False  # int8_dynamic: range taken per batch at run time

    def range_json(self) -> dict[str, float]:
        """A plan range entry from which the lowering recomputes exactly this scale and zero point."""
        if self.zero_point == 0 and self.qmin < 0:
            half = (self.qmax - self.qmin) / 2 if self.bits == 8 else self.qmax
            return {"amax": float(self.scale * half)}
        return {"min": float((self.qmin - self.zero_point) * self.scale),
                "max": float((self.qmax - self.zero_point) * self.scale)}


def default_weight_axis(op: str, weight_shape: tuple[int, ...], trans_b: bool = False) -> int:
    """The output-channel axis of a layer's weight: Conv O, ConvTranspose O/g, Gemm/MatMul N."""
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        return 0 if trans_b else 1
    return len(weight_shape) - 1  # MatMul: [.., K, N]


def weight_grid(precision: str, scheme: dict[str, Any], op: str, shape: tuple[int, ...], trans_b: bool = False) -> WeightGrid:
    """The grid a plan layer's ``weights`` entry names (compiler/dmpq.py ``_weight_scheme``).

    ``int8_per_channel_symmetric`` (``bits`` may lower it, e.g. 4 for an emulated
    W4A8), ``int4_block_zero_point`` / ``int4_block_symmetric`` with ``block_size``,
    ``per_tensor``; missing entries follow the precision (int4_weight: blocks of 32
    with zero points, as ort-cpu lowers them).
    """
    kind = str(scheme.get("scheme", ""))
    if not kind or kind == "fp32":
        kind = "int4_block_zero_point" if precision == INT4_WEIGHT else "int8_per_channel_symmetric"
    bits = int(scheme.get("bits", 4 if "int4" in kind else WEIGHT_BITS.get(precision, 8)))
    if kind.startswith("int8") and "int8_bits" in scheme:  # the width the ort-cpu build gives the codes
        bits = min(bits, int(scheme["int8_bits"]))
    axis = scheme.get("axis", default_weight_axis(op, shape, trans_b))
    axis = axis % len(shape) if axis is not None else None
    if "block" in kind:
        # blocks run along the reduction (input) axis, one column of blocks per output channel
        symmetric = bool(scheme.get("symmetric", not kind.endswith("zero_point")))
        return WeightGrid(bits, axis, _reduction_axis(op, shape, trans_b), int(scheme.get("block_size", 32)), symmetric)
    if "tensor" in kind:
        return WeightGrid(bits, None)
    return WeightGrid(bits, axis)


def _reduction_axis(op: str, shape: tuple[int, ...], trans_b: bool) -> int:
    if op == "Gemm":
        return 1 if trans_b else 0
    if op in ("Conv", "ConvTranspose"):
        return 1 if op == "Conv" else 0
    return max(len(shape) - 2, 0)


def group_ids(shape: tuple[int, ...], grid: WeightGrid) -> np.ndarray:
    """For each weight element, the index of the scale group it belongs to (int64, same shape)."""
    if grid.block_axis is None:
        if grid.axis is None:
            return np.zeros(shape, np.int64)
        view = [1] * len(shape)
        view[grid.axis] = shape[grid.axis]
        return np.broadcast_to(np.arange(shape[grid.axis]).reshape(view), shape).astype(np.int64)
    dims = list(shape)
    dims[grid.block_axis] = -(-shape[grid.block_axis] // grid.block_size)
    ids = np.zeros(shape, np.int64)
    stride = 1
    for d in reversed(range(len(shape))):
        coord = np.arange(shape[d])
        if d == grid.block_axis:
            coord = coord // grid.block_size
        view = [1] * len(shape)
        view[d] = shape[d]
        ids = ids + coord.reshape(view) * stride
        stride *= dims[d]
    return ids


def group_reduce(w: np.ndarray, ids: np.ndarray, kind: str) -> np.ndarray:
    """Per-group max |w| ("absmax"), min or max, as a vector indexed by group id."""
    n = int(ids.max()) + 1 if ids.size else 1
    flat, gid = w.astype(np.float64).ravel(), ids.ravel()
    if kind == "absmax":
        out = np.zeros(n)
        np.maximum.at(out, gid, np.abs(flat))
    elif kind == "min":
        out = np.full(n, np.inf)
        np.minimum.at(out, gid, flat)
    else:
        out = np.full(n, -np.inf)
        np.maximum.at(out, gid, flat)
    return out


def grid_params(lo: np.ndarray, hi: np.ndarray, grid: WeightGrid) -> tuple[np.ndarray, np.ndarray]:
    """(scales, zero points) per group from group ranges, exactly as the lowering computes them
    (symmetric: absmax / qmax; asymmetric: (hi - lo) / (2^b - 1) over a range holding 0)."""
    if grid.symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        return np.where(amax > 0, amax / grid.qmax, 1.0), np.zeros(amax.shape)
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    top = grid.qrange[1]
    scale = np.where(hi > lo, (hi - lo) / top, 1.0)
    return scale, np.clip(np.rint(-lo / scale), 0, top)


def rtn_params(w: np.ndarray, ids: np.ndarray, grid: WeightGrid, ratio: float | np.ndarray = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The lowering's (scales, zero points); ``ratio`` < 1 clips the range."""
    if grid.symmetric:
        amax = group_reduce(w, ids, "absmax") * ratio
        return grid_params(-amax, amax, grid)
    return grid_params(group_reduce(w, ids, "min") * ratio, group_reduce(w, ids, "max") * ratio, grid)


def mse_params(w: np.ndarray, ids: np.ndarray, grid: WeightGrid, ratios: tuple[float, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Per-group clipped range (ratio of the full one) that minimises the rounding MSE.

    Elements beyond the clip land on the end codes, so the written weights' range
    is still the clipped one and the lowering recomputes the same scale.
    """
    ratios = ratios or tuple(np.linspace(1.0, 0.5, 11))
    flat, gid = w.astype(np.float64).ravel(), ids.ravel()
    best_err, best = None, None
    for r in ratios:
        s, z = rtn_params(w, ids, grid, r)
        q = np.clip(np.rint(flat / s[gid]) + z[gid], *grid.qrange)
        err = np.bincount(gid, ((q - z[gid]) * s[gid] - flat) ** 2, minlength=s.size)
        if best is None:
            best_err, best = err, (s.copy(), z.copy())
            continue
        better = err < best_err
        best[0][better], best[1][better], best_err[better] = s[better], z[better], err[better]
    return best


def quantize_rtn(w: np.ndarray, scales: np.ndarray, zps: np.ndarray, ids: np.ndarray, grid: WeightGrid) -> np.ndarray:
    """Integer codes by round-to-nearest (half to even, as numpy and onnxruntime round)."""
    return np.clip(np.rint(w / scales[ids]) + zps[ids], *grid.qrange).astype(np.int32)


def keep_extremes(q: np.ndarray, w: np.ndarray, scales: np.ndarray, zps: np.ndarray, ids: np.ndarray,
                  grid: WeightGrid) -> np.ndarray:
    """Put each group's extreme weights back on their round-to-nearest codes (the end codes),
    so the range of the written weights, hence the lowering's scale, is unchanged."""
    if grid.symmetric:
        amax = group_reduce(w, ids, "absmax")
        at = (np.abs(w) >= amax[ids]) & (amax[ids] > 0)
    else:
        at = (w <= group_reduce(w, ids, "min")[ids]) | (w >= group_reduce(w, ids, "max")[ids])
    q = q.copy()
    q[at] = quantize_rtn(w, scales, zps, ids, grid)[at]
    return q


def dequantize(q: np.ndarray, scales: np.ndarray, zps: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return ((q.astype(np.float64) - zps[ids]) * scales[ids]).astype(np.float32)


# -- activations ---------------------------------------------------------------------------

def act_grid(precision: str, activations: dict[str, Any], tensor: str) -> ActGrid | None:
    """The quantiser a plan puts on ``tensor`` (compiler/dmpq.py ``activations``: method, symmetric,
    ranges per tensor), with the lowering's arithmetic (qdq.affine_params); None when not quantised."""
    if precision == INT8_DYNAMIC:
        return ActGrid(8, 1.0, 0, 0, 255, dynamic=True)
    if precision not in (INT8, INT16X8) or not activations:
        return None
    entry = activations.get("ranges", {}).get(tensor)
    if entry is None:
        return None
    lo, hi = range_from_json(entry)
    if precision == INT16X8:
        amax = max(abs(lo), abs(hi), 1e-12)
        return ActGrid(16, amax / 32767.0, 0, -32768, 32767)
    if activations.get("symmetric", False):
        scale, zp = affine_params(lo, hi, "int8", symmetric=True)
        return ActGrid(8, float(scale), int(zp), -128, 127)
    scale, zp = affine_params(lo, hi, "uint8")
    return ActGrid(8, float(scale), int(zp), 0, 255)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through)."""
    return (x.round() - x).detach() + x


def grad_scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Same value, gradient multiplied by ``factor`` (LSQ's step-size gradient scaling)."""
    return (x - x * factor).detach() + x * factor


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: float, qmin: int, qmax: int) -> torch.Tensor:
    """Quantise-dequantise with STE rounding; gradients reach ``scale`` as in LSQ."""
    return (torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


class ActQuant(torch.nn.Module):
    """An activation quantiser; ``learn`` makes its step size an LSQ parameter."""

    def __init__(self, grid: ActGrid, learn: bool = False) -> None:
        super().__init__()
        self.grid = grid
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(grid.scale)), requires_grad=learn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.grid
        if g.dynamic:  # asymmetric uint8 from this batch's range, as ORT's dynamic quantisation does
            lo, hi = torch.clamp(x.min().detach(), max=0.0), torch.clamp(x.max().detach(), min=0.0)
            scale = torch.clamp((hi - lo) / 255.0, min=1e-12)
            return fake_quant(x, scale, torch.round(-lo / scale).item(), 0, 255)
        scale = torch.exp(self.log_scale)
        if self.log_scale.requires_grad:
            scale = grad_scaled(scale, 1.0 / math.sqrt(max(x.numel(), 1) * g.qmax))
        return fake_quant(x, scale, g.zero_point, g.qmin, g.qmax)

    def learned(self) -> ActGrid:
        g = self.grid
        return ActGrid(g.bits, float(torch.exp(self.log_scale).item()), g.zero_point, g.qmin, g.qmax, g.dynamic)
