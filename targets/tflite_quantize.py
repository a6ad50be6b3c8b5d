"""Quantize a float .tflite with ai-edge-quantizer, per op, with our ranges.

ai-edge-quantizer takes a recipe (regex over an op's output tensor names ->
op config; the later rule wins) and, for static precisions, a "calibration
result": min/max per tensor name. Its own ``calibrate()`` builds that result
with a moving average that lets the first samples dominate; instead we hand
``quantize()`` the ranges dscompile calibrated (the CalibrationTable, carried
over to TFLite tensor names by the verified tensor map). One rule per op,
anchored on its exact scope, so the plan is applied op by op.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dscompile.compiler.capabilities import (
    FP16,
    FP32,
    INT4_WEIGHT,
    INT8,
    INT8_DYNAMIC,
    INT8_WEIGHT,
    INT16X8,
)
from dscompile.errors import InputError

STATIC_BITS = {INT8: 8, INT16X8: 16}


@dataclass(frozen=True)
class OpRecipe:
    algorithm: str
    config: dict[str, Any]  # OpQuantizationConfig as ai-edge-quantizer's recipe JSON


def _tensor(bits: int, symmetric: bool, granularity: str = "CHANNELWISE", dtype: str = "INT") -> dict[str, Any]:
    return {"num_bits": bits, "symmetric": symmetric, "granularity": granularity, "dtype": dtype}


def recipe_for(precision: str, activation_symmetric: bool = False) -> OpRecipe | None:
    """The ai-edge-quantizer op config for a precision (None: leave the op float)."""
    minmax = "min_max_uniform_quantize"
    if precision == FP32:
        return None
    if precision == FP16:
        return OpRecipe("float_casting", {
            "weight_tensor_config": _tensor(16, True, "TENSORWISE", "FLOAT"),
            "compute_precision": "FLOAT", "explicit_dequantize": True,
        })
    if precision in STATIC_BITS:
        bits = STATIC_BITS[precision]
        return OpRecipe(minmax, {
            # int16 activations must be symmetric (TFLite's 16x8 kernels have no zero point)
            "activation_tensor_config": _tensor(bits, activation_symmetric or bits == 16, "TENSORWISE"),
            "weight_tensor_config": _tensor(8, True),
            "compute_precision": "INTEGER", "explicit_dequantize": False,
        })
    if precision == INT8_DYNAMIC:
        return OpRecipe(minmax, {"weight_tensor_config": _tensor(8, True),
                                 "compute_precision": "INTEGER", "explicit_dequantize": False})
    if precision in (INT8_WEIGHT, INT4_WEIGHT):
        bits = 8 if precision == INT8_WEIGHT else 4
        return OpRecipe(minmax, {"weight_tensor_config": _tensor(bits, True),
                                 "compute_precision": "FLOAT", "explicit_dequantize": True})
    raise InputError(f"the snapdragon target has no TFLite lowering for precision {precision!r}")


def op_scopes(model: bytes) -> list[str]:
    """ai-edge-quantizer's scope string of every op of subgraph 0, in op order."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils

    m = tfl_flatbuffer_utils.read_model(bytearray(model))
    sg = m.subgraphs[0]
    return [tfl_flatbuffer_utils.get_op_scope(op, sg.tensors) for op in sg.operators]


def build_recipe(model: bytes, precisions: Mapping[int, str], symmetric: Mapping[int, bool]) -> list[dict[str, Any]]:
    """A recipe with one exact-scope rule per quantized op (ops not named stay float)."""
    scopes = op_scopes(model)
    recipe = []
    for index, precision in sorted(precisions.items()):
        r = recipe_for(precision, symmetric.get(index, False))
        if r is None:
            continue
        recipe.append({"regex": "^" + re.escape(scopes[index]) + "$", "operation": "*",
                       "algorithm_key": r.algorithm, "op_config": r.config})
    return recipe


def qsvs(ranges: Mapping[str, tuple[float, float]], ranks: Mapping[str, int]) -> dict[str, dict[str, np.ndarray]]:
    """Our [lo, hi] per tensor in ai-edge-quantizer's calibration-result shape."""
    out = {}
    for name, (lo, hi) in ranges.items():
        shape = (1,) * ranks.get(name, 1)
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # the quantized grid must hold 0 exactly
        if hi - lo < 1e-12:
            hi = lo + 1e-6
        out[name] = {"min": np.full(shape, lo, np.float32), "max": np.full(shape, hi, np.float32)}
    return out


def quantize(model: bytes, recipe: list[dict[str, Any]], calibration: dict[str, dict[str, np.ndarray]]) -> bytes:
    """Apply ``recipe`` to the float ``model`` with the given per-tensor ranges."""
    if not recipe:
        return model
    from ai_edge_quantizer import quantizer

    from dscompile.profiles.litert_runner import quiet_c_output

    q = quantizer.Quantizer(bytearray(model), recipe)
    try:
        with quiet_c_output(), warnings.catch_warnings():  # it runs LiteRT interpreters, which log
            warnings.simplefilter("ignore")
            result = q.quantize(calibration or None, enable_progress_bar=False, enable_progress_report=False)
    except (ValueError, KeyError, RuntimeError) as exc:
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise InputError(f"ai-edge-quantizer could not apply the plan: {text}") from None
    return bytes(result.quantized_model)
