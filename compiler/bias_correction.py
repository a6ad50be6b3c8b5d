"""Bias correction: remove the mean output shift a quantised layer introduces.

Empirical form (Nagel et al. 2019, section 4.2, with measured rather than
BN-derived statistics): over the calibration samples, the per-channel mean of
(quantised layer on the student's quantised input) - (FP32 layer on FP32
input) is subtracted from the layer's bias. It uses the pre-activation output,
where the shift is additive.
"""

from __future__ import annotations

import numpy as np
import torch

from dscompile.compiler.distill_data import LayerData, channel_axis
from dscompile.compiler.distill_ops import LayerModel


@torch.no_grad()
def output_shift(layer: LayerModel, data: LayerData, wq: torch.Tensor, b: torch.Tensor | None, quant_in) -> np.ndarray:
    """Per-output-channel mean of (quantised pre-activation - FP32 pre-activation)."""
    total: torch.Tensor | None = None
    count = 0
    for x, y in data.chunks():
        diff = layer.pre(quant_in(x), wq, b) - y
        axis = channel_axis(layer.spec, diff.dim())
        dims = [d for d in range(diff.dim()) if d != axis]
        s = diff.double().sum(dims)
        total = s if total is None else total + s
        count += diff.numel() // diff.shape[axis]
    assert total is not None
    return (total / max(count, 1)).numpy()


def corrected_bias(bias: np.ndarray | None, shift: np.ndarray) -> np.ndarray:
    """The bias minus the shift, in the bias's own shape (a new bias when the layer had none)."""
    if bias is None:
        return (-shift).astype(np.float32)
    return (bias.astype(np.float64) - shift.reshape(bias.shape) if bias.size == shift.size else
            bias.astype(np.float64) - shift).astype(np.float32)
