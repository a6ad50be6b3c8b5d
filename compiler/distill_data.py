"""Mini-batches for layer reconstruction, sub-sampled so memory and time stay bounded.

A Conv layer is trained on random output patches: the crop of the padded input
that produces exactly those outputs, so one step costs a few patches rather
than whole feature maps. Matrix layers are trained on random rows (tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dscompile.compiler.distill_ops import LayerSpec, pad_input

PATCH = 8  # output rows/cols per patch


@dataclass
class LayerData:
    """A layer's captured student input ``x`` and FP32 pre-activation ``y`` (torch, float32)."""

    spec: LayerSpec
    x: torch.Tensor
    y: torch.Tensor

    @property
    def patched(self) -> bool:
        return self.spec.op.op == "Conv" and self.x.dim() >= 3

    @property
    def rows(self) -> bool:
        return self.spec.op.op in ("MatMul", "Gemm") and not self.spec.op.attrs.get("transA", 0)

    def padded(self, w_shape: tuple[int, ...]) -> torch.Tensor:
        if not hasattr(self, "_padded"):
            self._padded = pad_input(self.x, self.spec.op.pads(tuple(self.x.shape), w_shape))
        return self._padded

    def batch(self, rng: np.random.Generator, size: int, w_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(input, target pre-activation, input already padded)."""
        if self.patched:
            return (*self._patches(rng, size, w_shape), True)
        if self.rows:
            xr = self.x.reshape(-1, self.x.shape[-1])
            yr = self.y.reshape(-1, self.y.shape[-1])
            idx = torch.from_numpy(rng.integers(0, xr.shape[0], size * 16))
            return xr[idx], yr[idx], False
        idx = torch.from_numpy(rng.integers(0, self.x.shape[0], min(size, self.x.shape[0])))
        return self.x[idx], self.y[idx], False

    def _patches(self, rng: np.random.Generator, size: int, w_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.spec.op.attrs
        nd = len(w_shape) - 2
        strides, dil = a.get("strides", [1] * nd), a.get("dilations", [1] * nd)
        xp = self.padded(w_shape)
        out_sizes = self.y.shape[2:]
        p = [min(PATCH, o) for o in out_sizes]
        xs, ys = [], []
        for _ in range(size):
            n = int(rng.integers(0, self.x.shape[0]))
            start = [int(rng.integers(0, o - q + 1)) for o, q in zip(out_sizes, p, strict=True)]
            yi = (n, slice(None), *[slice(s, s + q) for s, q in zip(start, p, strict=True)])
            xi = (n, slice(None), *[
                slice(s * st, (s + q - 1) * st + d * (k - 1) + 1)
                for s, q, st, d, k in zip(start, p, strides, dil, w_shape[2:], strict=True)
            ])
            xs.append(xp[xi])
            ys.append(self.y[yi])
        return torch.stack(xs), torch.stack(ys)

    def chunks(self, size: int = 64):
        """Whole samples in order, for evaluation and bias statistics."""
        for i in range(0, self.x.shape[0], size):
            yield self.x[i:i + size], self.y[i:i + size]


def channel_axis(spec: LayerSpec, ndim: int) -> int:
    """Axis of the output channels in the layer's output."""
    return 1 if spec.op.op in ("Conv", "ConvTranspose") else ndim - 1


def samples_within(bytes_per_sample: int, budget_mb: float, wanted: int) -> int:
    """How many samples fit the capture memory budget (at least 1)."""
    return max(1, min(wanted, int(budget_mb * 2**20 // max(bytes_per_sample, 1))))
