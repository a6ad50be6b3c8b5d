"""Generic quantise/dequantise graph primitives (no placement policy).

The arithmetic (``symmetric_per_channel``, ``affine_params``, ``block_int4``)
and the graph edits (``GraphEditor`` and the ``add_*`` / ``replace_*``
functions) are shared by every target; *where* Q/DQ pairs go is each target's
decision, made in its own module.

Conventions:
- weights: symmetric int8, one scale per output channel (zero point 0);
- activations: per-tensor, uint8 with a zero point (asymmetric) or int8
  symmetric, from a calibration range;
- int4 weights: block-wise along the reduction axis, either onnxruntime's
  ``com.microsoft.MatMulNBits`` packing or an opset-21 ``DequantizeLinear``
  with ``block_size`` (INT4, symmetric), which TensorRT reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from dscompile.compiler.graph_edit import GraphEditor

__all__ = ["GraphEditor"]  # re-exported: qdq.GraphEditor is the documented entry point

MS_DOMAIN = "com.microsoft"
_QRANGE = {"uint8": (0, 255), "int8": (-128, 127)}
_ONNX_INT = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8}


# ---------------------------------------------------------------- arithmetic


@dataclass(frozen=True)
class QuantizedWeight:
    """An integer weight tensor with its scales (zero point 0 unless ``zero_point`` is set)."""

    q: np.ndarray
    scale: np.ndarray  # float32, shape [channels] (per-channel) or block grid
    axis: int | None
    zero_point: np.ndarray | None = None
    block_size: int = 0  # > 0: ``scale`` holds one value per block of this many along ``axis``

    def dequantize(self) -> np.ndarray:
        scale = self.scale
        if self.block_size and self.axis is not None:
            scale = np.repeat(scale, self.block_size, axis=self.axis)
            scale = np.take(scale, np.arange(self.q.shape[self.axis]), axis=self.axis)
        elif self.axis is not None and scale.ndim == 1 and scale.size > 1:
            shape = [1] * self.q.ndim
            shape[self.axis] = -1
            scale = scale.reshape(shape)
        zp = 0 if self.zero_point is None else self.zero_point
        return ((self.q.astype(np.float32) - zp) * scale).astype(np.float32)


def symmetric_per_channel(w: np.ndarray, axis: int, bits: int = 8) -> QuantizedWeight:
    """Symmetric per-channel quantisation along ``axis``: q = round(w / s), s = max|w| / (2^(b-1) - 1)."""
    w = np.asarray(w, dtype=np.float32)
    axis = axis % w.ndim
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(w), axis=reduce) if reduce else np.abs(w)
    qmax = 2 ** (bits - 1) - 1
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return QuantizedWeight(q, scale, axis)


def affine_params(lo: float, hi: float, dtype: str = "uint8", symmetric: bool = False) -> tuple[np.float32, int]:
    """(scale, zero_point) covering [lo, hi]; the range always includes 0 so zeros stay exact."""
    qmin, qmax = _QRANGE[dtype]
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        amax = max(abs(lo), abs(hi))
        # int8: TensorRT's grid (scale amax / 127, codes -127..127); uint8 around 128
        scale = (amax / (qmax if dtype == "int8" else (qmax - qmin) / 2)) if amax > 0 else 1.0
        zp = 0 if dtype == "int8" else 128
        return np.float32(scale), zp
    scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
    zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return np.float32(scale), zp


def fake_quantize(x: np.ndarray, scale: float, zp: int, dtype: str = "uint8") -> np.ndarray:
    qmin, qmax = _QRANGE[dtype]
    return ((np.clip(np.rint(x / scale) + zp, qmin, qmax) - zp) * scale).astype(np.float32)


@dataclass(frozen=True)
class BlockInt4:
    """MatMulNBits packing of a [K, N] weight: uint4 codes with per-block scales and zero points."""

    packed: np.ndarray  # uint8 [N, k_blocks, block_size // 2]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks / 2)], two 4-bit codes per byte
    k: int
    n: int
    block_size: int

    def dequantize(self) -> np.ndarray:
        codes = _unpack_nibbles(self.packed.reshape(self.n, -1)).reshape(self.n, -1, self.block_size)
        kb = codes.shape[1]
        zp = np.full((self.n, kb), 8, np.float32)
        if self.zero_points is not None:
            zp = _unpack_nibbles(self.zero_points)[:, :kb].astype(np.float32)
        w = (codes.astype(np.float32) - zp[..., None]) * self.scales[..., None]
        return w.reshape(self.n, -1)[:, : self.k].T.copy()


def _unpack_nibbles(a: np.ndarray) -> np.ndarray:
    low, high = a & 0x0F, a >> 4
    return np.stack([low, high], axis=-1).reshape(*a.shape[:-1], -1)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two uint4 codes per byte along the last axis, the first in the low nibble."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), codes.dtype)], axis=-1)
    c = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, 2)
    return (c[..., 0] | (c[..., 1] << 4)).astype(np.uint8)


# Clip ratios the int4 block quantisers try (of each block's range), keeping the one with the least
# squared rounding error: 4-bit blocks of 32 are dominated by one or two outliers, and clipping them
# halves the error of the rest. Same ratios as compiler/distill_quant.mse_params, and 1.0 first with a
# strict "better", so weights already on a grid with their extremes on the end codes keep it exactly.
CLIP_RATIOS = tuple(np.linspace(1.0, 0.5, 11))


def block_int4(w: np.ndarray, block_size: int = 32, symmetric: bool = False) -> BlockInt4:
    """Block-wise 4-bit quantisation of a [K, N] MatMul weight along K (MatMulNBits layout),
    each block's range clipped where that lowers its rounding error (``CLIP_RATIOS``)."""
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    kb = -(-k // block_size)
    padded = np.zeros((kb * block_size, n), np.float32)
    padded[:k] = w
    blocks = padded.T.reshape(n, kb, block_size)
    if symmetric:
        amax = np.abs(blocks).max(-1)
        # narrow range (codes 1..15, i.e. -7..7 around the implicit zero point 8), as distillation's grid
        scales, _ = _clip_search(blocks, lambda r: (np.where(amax > 0, amax * r / 7.0, 1.0), np.full(amax.shape, 8.0)), (1, 15))
        codes = np.clip(np.rint(blocks / scales[..., None]) + 8, 1, 15)
        return pack_block_int4(codes, scales, None, k, block_size)
    scales, zp = int4_block_params(blocks)
    codes = np.clip(np.rint(blocks / scales[..., None]) + zp[..., None], 0, 15)
    return pack_block_int4(codes, scales, zp, k, block_size)


def int4_block_params(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scales, zero points 0..15) of asymmetric uint4 blocks [..., size], the range of each
    clipped where that lowers its rounding error (``CLIP_RATIOS``); the range always holds 0."""
    lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)

    def params(r: float) -> tuple[np.ndarray, np.ndarray]:
        s = np.where(hi > lo, (hi - lo) * r / 15.0, 1.0)
        return s, np.clip(np.rint(-lo * r / s), 0, 15)
    return _clip_search(blocks, params)


def pack_block_int4(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int,
                    block_size: int) -> BlockInt4:
    """MatMulNBits packing of uint4 codes [N, blocks, block_size] (``zero_points`` [N, blocks] or None:
    the implicit 8)."""
    n, kb = scales.shape
    packed = _pack_nibbles(codes.astype(np.uint8).reshape(n, -1)).reshape(n, kb, block_size // 2)
    zps = None if zero_points is None else _pack_nibbles(np.asarray(zero_points).astype(np.uint8))
    return BlockInt4(packed, np.asarray(scales, np.float32), zps, k, n, block_size)


def _clip_search(blocks: np.ndarray, params, qrange: tuple[int, int] = (0, 15)) -> tuple[np.ndarray, np.ndarray]:
    """(scales float32, zero points) per block [..., size] over ``CLIP_RATIOS``; ``params(r)`` gives
    a ratio's (scales, zero points) as the lowering stores them."""
    b = blocks.astype(np.float64)
    best = None
    for r in CLIP_RATIOS:
        s, z = params(r)
        s = np.asarray(s, np.float32).astype(np.float64)
        q = np.clip(np.rint(b / s[..., None]) + z[..., None], *qrange)
        err = (((q - z[..., None]) * s[..., None] - b) ** 2).sum(-1)
        if best is None:
            best = [err, s, np.asarray(z, np.float64)]
            continue
        better = err < best[0]
        best[0] = np.where(better, err, best[0])
        best[1] = np.where(better, s, best[1])
        best[2] = np.where(better, z, best[2])
    return best[1].astype(np.float32), best[2]


def block_int4_signed(w: np.ndarray, block_size: int, axis: int = 0) -> QuantizedWeight:
    """Symmetric signed int4 blocks along ``axis`` (for DequantizeLinear-21 with ``block_size``): codes
    -7..7, each block's range clipped where that lowers its rounding error (the grid ``block_int4``
    uses with ``symmetric=True``, so DMPQ's emulator sees the weights this lowering writes)."""
    w = np.asarray(w, dtype=np.float32)
    axis = axis % w.ndim
    moved = np.moveaxis(w, axis, 0)
    k, rest = moved.shape[0], moved.shape[1:]
    kb = -(-k // block_size)
    pad = np.zeros((kb * block_size, *rest), np.float32)
    pad[:k] = moved
    blocks = np.moveaxis(pad.reshape(kb, block_size, -1), 1, -1)  # [kb, rest, block]
    amax = np.abs(blocks).max(-1)
    zero = np.zeros(amax.shape)
    scale, _ = _clip_search(blocks, lambda r: (np.where(amax > 0, amax * r / 7.0, 1.0), zero), (-7, 7))
    q = np.clip(np.rint(blocks / scale[..., None]), -7, 7)
    q = np.moveaxis(q, -1, 1).reshape(kb * block_size, *rest)[:k]
    scale = scale.reshape(kb, *rest)
    return QuantizedWeight(np.moveaxis(q.astype(np.int8), 0, axis), np.moveaxis(scale, 0, axis), axis, None, block_size)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def channel_axis(node: onnx.NodeProto, weight_ndim: int) -> int:
    """The output-channel axis of the weight (input 1) of Conv/ConvTranspose/Gemm/MatMul."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gather":
        return 0  # one scale per embedding row
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    return weight_ndim - 1 if node.op_type == "MatMul" else 0


def as_kn(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    """A MatMul/Gemm weight as [K, N] (Gemm with transB stores [N, K]); an embedding table [V, D] as [D, V]
    (its blocks run along each row)."""
    if node.op_type == "Gather":
        return np.ascontiguousarray(w.T)
    return np.ascontiguousarray(w.T) if node.op_type == "Gemm" and _attr(node, "transB", 0) else w


# ---------------------------------------------------------------- graph edits
# GraphEditor lives in graph_edit.py; it is re-exported here for the targets that use it.


def add_activation_qdq(
    ed: GraphEditor, tensor: str, scale: float, zero_point: int, dtype: str = "uint8",
    consumers: list[onnx.NodeProto] | None = None,
) -> str:
    """Insert QuantizeLinear -> DequantizeLinear on ``tensor``; consumers read the DQ output.

    One pair per tensor: asking again returns the same DQ output (and rewires the
    newly named consumers to it).
    """
    key = ("act", tensor)
    if key not in ed.cache:
        s = ed.add_initializer(f"{tensor}_scale", np.array(scale, np.float32))
        z = ed.add_initializer(f"{tensor}_zero_point", np.array(zero_point, dtype=dtype))
        q_out, dq_out = ed.unique(f"{tensor}_quantized"), ed.unique(f"{tensor}_dequantized")
        users = consumers if consumers is not None else ed.consumers(tensor)
        ed.add_node("QuantizeLinear", [tensor, s, z], [q_out], f"{tensor}_QuantizeLinear")
        ed.add_node("DequantizeLinear", [q_out, s, z], [dq_out], f"{tensor}_DequantizeLinear")
        ed.cache[key] = dq_out
        ed.rewire(tensor, dq_out, users)
    elif consumers is not None:
        ed.rewire(tensor, ed.cache[key], consumers)
    return ed.cache[key]


def add_weight_dq(ed: GraphEditor, weight: str, axis: int, bits: int = 8) -> tuple[str, QuantizedWeight]:
    """Replace a float weight by int8 per-channel codes + DequantizeLinear(axis); shared weights once."""
    key = ("w8", weight, axis, bits)
    if key not in ed.cache:
        qw = symmetric_per_channel(ed.weight(weight), axis, bits)
        q = ed.add_initializer(f"{weight}_quantized", qw.q)
        s = ed.add_initializer(f"{weight}_scale", qw.scale)
        z = ed.add_initializer(f"{weight}_zero_point", np.zeros(qw.scale.shape, np.int8))
        out = ed.unique(f"{weight}_dequantized")
        ed.add_node("DequantizeLinear", [q, s, z], [out], f"{weight}_DequantizeLinear", axis=axis)
        ed.cache[key] = out
        ed.qweights[key] = qw
    return ed.cache[key], ed.qweights[key]


def add_bias_dq(ed: GraphEditor, bias: str, input_scale: float, weight_scale: np.ndarray) -> str:
    """Int32 bias with scale = input scale x weight scale (what integer Conv/Gemm kernels add)."""
    key = ("b32", bias, float(input_scale))
    if key not in ed.cache:
        b = ed.weight(bias).astype(np.float64)
        scale = (np.float64(input_scale) * weight_scale.astype(np.float64)).astype(np.float32)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(b / scale), -(2**31), 2**31 - 1).astype(np.int32)
        qn = ed.add_initializer(f"{bias}_quantized", q)
        sn = ed.add_initializer(f"{bias}_scale", scale)
        zn = ed.add_initializer(f"{bias}_zero_point", np.zeros(scale.shape, np.int32))
        out = ed.unique(f"{bias}_dequantized")
        ed.add_node("DequantizeLinear", [qn, sn, zn], [out], f"{bias}_DequantizeLinear", axis=0)
        ed.cache[key] = out
    return ed.cache[key]


def replace_matmul_nbits(
    ed: GraphEditor, node: onnx.NodeProto, weight: np.ndarray, block_size: int = 32,
    accuracy_level: int = 0, bias: str | None = None, symmetric: bool = False, packed: BlockInt4 | None = None,
) -> onnx.NodeProto:
    """Turn ``MatMul(A, W)`` ([K, N] weight) into ``com.microsoft.MatMulNBits`` with 4-bit blocks
    (``packed``: codes already chosen, e.g. by GPTQ; round-to-nearest otherwise)."""
    qb = packed if packed is not None else block_int4(weight, block_size, symmetric)
    base = node.input[1]
    inputs = [
        node.input[0],
        ed.add_initializer(f"{base}_int4", qb.packed),
        ed.add_initializer(f"{base}_int4_scales", qb.scales.reshape(-1)),
    ]
    if qb.zero_points is not None:
        inputs.append(ed.add_initializer(f"{base}_int4_zero_points", qb.zero_points.reshape(-1)))
    if bias:
        inputs += [""] * (5 - len(inputs)) + [bias]  # A, B, scales, zero_points, g_idx, bias
    new = ed.add_node(
        "MatMulNBits", inputs, list(node.output), node.name, MS_DOMAIN,
        K=qb.k, N=qb.n, bits=4, block_size=block_size, accuracy_level=accuracy_level,
    )
    ed.remove_nodes({node.name})
    new.name = node.name  # keep the layer's node name (profiles and plans refer to it)
    return new


def add_weight_dq_int4_block(ed: GraphEditor, weight: str, block_size: int, axis: int = 0) -> tuple[str, QuantizedWeight]:
    """INT4 codes + opset-21 DequantizeLinear with ``block_size`` along ``axis`` (symmetric)."""
    key = ("w4", weight, block_size, axis)
    if key not in ed.cache:
        qw = block_int4_signed(ed.weight(weight), block_size, axis)
        flat = qw.q.reshape(-1).astype(np.int8)
        raw = _pack_nibbles((flat & 0x0F).astype(np.uint8)).tobytes()
        q = ed.add_raw_initializer(f"{weight}_int4", TensorProto.INT4, list(qw.q.shape), raw)
        s = ed.add_initializer(f"{weight}_int4_scale", qw.scale)
        out = ed.unique(f"{weight}_dequantized")
        ed.add_node("DequantizeLinear", [q, s], [out], f"{weight}_DequantizeLinear", axis=axis, block_size=block_size)
        ed.cache[key] = out
        ed.qweights[key] = qw
    return ed.cache[key], ed.qweights[key]


def replace_dynamic_matmul(
    ed: GraphEditor, node: onnx.NodeProto, weight: np.ndarray, bias: str | None = None, per_channel: bool = True,
    bits: int = 8,
) -> onnx.NodeProto:
    """Turn ``MatMul(A, W)`` into ``com.microsoft.DynamicQuantizeMatMul``: A quantised to uint8 at
    run time (per tensor), W int8 symmetric (per output column when ``per_channel``) on ``bits``-bit codes."""
    if per_channel:
        qw = symmetric_per_channel(weight, axis=-1, bits=bits)
    else:
        qmax = 2 ** (bits - 1) - 1
        amax = float(np.abs(weight).max()) or 1.0
        scale = np.float32(amax / qmax)
        qw = QuantizedWeight(np.clip(np.rint(weight / scale), -qmax, qmax).astype(np.int8), np.array([scale]), None)
    base = node.input[1]
    inputs = [
        node.input[0],
        ed.add_initializer(f"{base}_int8", qw.q),
        ed.add_initializer(f"{base}_int8_scale", qw.scale.astype(np.float32)),
        ed.add_initializer(f"{base}_int8_zero_point", np.zeros(qw.scale.shape, np.int8)),
    ]
    if bias:
        inputs.append(bias)
    new = ed.add_node("DynamicQuantizeMatMul", inputs, list(node.output), node.name, MS_DOMAIN)
    ed.remove_nodes({node.name})
    new.name = node.name
    return new


def replace_gather_block_quantized(
    ed: GraphEditor, node: onnx.NodeProto, table: np.ndarray, bits: int = 4, block_size: int = 32,
) -> onnx.NodeProto:
    """Turn ``Gather(table [V, D], indices)`` into ``com.microsoft.GatherBlockQuantized``: uint8 codes,
    symmetric blocks of ``block_size`` along each row (implicit zero point 2^(bits-1)), float16
    scales (the op's output takes the scales' type, so a Cast brings a float32 model's rows back)."""
    v, d = table.shape
    q, scales = _row_blocks(table, bits, block_size)
    codes = (q + 2 ** (bits - 1)).astype(np.uint8).reshape(v, -1)[:, :d]
    data = _pack_nibbles(codes) if bits == 4 else codes
    base = node.input[0]
    inputs = [ed.add_initializer(f"{base}_q{bits}", data), node.input[1],
              ed.add_initializer(f"{base}_q{bits}_scales", scales.astype(np.float16))]
    out = node.output[0]
    half = ed.unique(f"{out}_fp16") if table.dtype != np.float16 else out
    new = ed.add_node("GatherBlockQuantized", inputs, [half], node.name, MS_DOMAIN,
                      gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits)
    if half != out:
        ed.add_node("Cast", [half], [out], f"{node.name}_Cast", to=helper.np_dtype_to_tensor_dtype(table.dtype))
    ed.remove_nodes({node.name})
    new.name = node.name
    return new


def gather_block_dequantized(table: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """The table GatherBlockQuantized reads back (for emulation)."""
    v, d = table.shape
    q, scales = _row_blocks(table, bits, block_size)
    return (q * scales[..., None]).reshape(v, -1)[:, :d].astype(np.float32)


def _row_blocks(table: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric codes [V, blocks, block_size] and float16-representable scales [V, blocks] of a
    zero-padded table, each block's range clipped where that lowers its rounding error."""
    v, d = table.shape
    kb = -(-d // block_size)
    padded = np.zeros((v, kb * block_size), np.float32)
    padded[:, :d] = table
    blocks = padded.reshape(v, kb, block_size)
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(blocks).max(-1)
    tiny = float(np.finfo(np.float16).tiny)

    def params(r: float) -> tuple[np.ndarray, np.ndarray]:
        s = np.where(amax > 0, np.maximum(amax * r / qmax, tiny), 1.0).astype(np.float16).astype(np.float32)
        return s, np.zeros(amax.shape)
    scales, _ = _clip_search(blocks, params, (-qmax - 1, qmax))
    return np.clip(np.rint(blocks / scales[..., None]), -qmax - 1, qmax), scales


def onnx_int_type(dtype: str) -> int:
    return _ONNX_INT[dtype]
