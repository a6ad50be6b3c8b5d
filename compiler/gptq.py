"""GPTQ: error-compensating 4-bit rounding of MatMul weights (Frantar et al. 2022, arXiv:2210.17323).

Round-to-nearest rounds every weight alone. GPTQ rounds the input rows of a [K, N]
weight one at a time and spreads each row's rounding error over the rows not yet
rounded, in proportion to how the layer's calibration inputs correlate: it
minimises ||X W - X W_q||^2 over the layer's inputs X, not ||W - W_q||^2. What it
needs from the data is the layer's input Hessian H = X^T X, summed over every token
of every calibration sample (any shapes: only the last axis, K, is kept).

The grid is the one MatMulNBits reads (``qdq.block_int4``): uint4 codes in blocks of
``block_size`` along K with a float32 scale and a uint4 zero point per block, each
block's range clipped where that lowers its rounding error (``qdq.CLIP_RATIOS``).
A block's scale and zero point are chosen when GPTQ reaches the block, from the
block's weights as the earlier rows' errors have moved them.

Deterministic: float64 throughout, no sampling.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np
import onnx

from dscompile.compiler import qdq

log = logging.getLogger("dscompile")

Feed = dict[str, np.ndarray]
# Of the mean Hessian diagonal. The paper's 0.01 assumes far more tokens than a few calibration sentences
# give: on all-MiniLM-L6-v2 (332 tokens, inputs of 384 and 1536) 0.1 measured cosine 0.9874 where 0.01
# overfitted to 0.9838 (linear layers int4, 24 held-out sentences); 0.3 and 1.0 were worse again.
DAMP = 0.1
LAZY = 128  # rows per lazy batch (the paper's B): updates the rest of W once per batch


def capture_hessians(model: onnx.ModelProto, tensors: Sequence[str], feeds: Sequence[Feed],
                     threads: int | None = None) -> dict[str, np.ndarray]:
    """X^T X (float64 [K, K]) of each named float tensor over every row of its last axis, every sample.

    Samples may differ in shape: each runs alone. Tensors no sample produced are left out.
    """
    from dscompile.compiler.distill_capture import prefix, with_outputs
    from dscompile.compiler.runtime import ort_session

    names = list(dict.fromkeys(tensors))
    if not names or not feeds:
        return {}
    sess = ort_session(with_outputs(prefix(model, names), names), threads, optimize=False)
    inputs = {i.name for i in sess.get_inputs()}
    out: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for feed in feeds:
        for name, x in zip(names, sess.run(names, {k: v for k, v in feed.items() if k in inputs}), strict=True):
            x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
            out[name] = out.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]
    _warn_if_thin(rows, {k: h.shape[0] for k, h in out.items()}, len(feeds))
    return out


def _warn_if_thin(rows: dict[str, int], widths: dict[str, int], samples: int) -> None:
    """Fewer rows than inputs leave X^T X rank-deficient: GPTQ then fits the few rows seen, not the
    layer (all-MiniLM-L6-v2 at 1/6 size: output cosine 0.988 from 16 sentences, 0.991 from 144)."""
    thin = [k for k in rows if rows[k] < widths[k]]
    if thin:
        worst = min(thin, key=lambda k: rows[k] / widths[k])
        log.warning(f"gptq: {len(thin)} of {len(rows)} MatMul/Gemm inputs GPTQ fits int4 weights to saw fewer rows than their width over "
                    f"{samples} samples (e.g. {worst}: {rows[worst]} rows, width {widths[worst]}); int4 rounding "
                    "fits those few rows; calibrate on more samples")


# The plan's sensitivity pass and every build of the repair loop ask for the same Hessians and the same
# rounded weights: both are kept for the last model and samples (``layer_hessians``) and the last
# weights rounded (``rounded``), so the second ask is free.
_HESSIANS: dict[str, dict[str, np.ndarray]] = {}
_ROUNDED: dict[str, qdq.BlockInt4] = {}
_ROUNDED_KEEP = 512


def _digest(*arrays: np.ndarray, text: str = "") -> str:
    h = hashlib.sha256(text.encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.shape).encode() + str(a.dtype).encode() + a.tobytes())
    return h.hexdigest()


def layer_hessians(model: onnx.ModelProto, tensors: Sequence[str], feeds: Sequence[Feed],
                   threads: int | None = None) -> dict[str, np.ndarray]:
    """``capture_hessians``, kept for the last (model, tensors, feeds) asked."""
    names = sorted(set(tensors))
    key = _digest(*(v for f in feeds for _, v in sorted(f.items())),
                  text=hashlib.sha256(model.SerializeToString()).hexdigest() + "|".join(names))
    if key not in _HESSIANS:
        _HESSIANS.clear()
        _HESSIANS[key] = capture_hessians(model, names, feeds, threads)
    return _HESSIANS[key]


def matmul_inputs(model: onnx.ModelProto, anchors: Sequence[str]) -> list[str]:
    """The activation input of each named MatMul/Gemm node with a constant weight: the tensors whose
    Hessians GPTQ needs. The sensitivity pass and the build ask for the same set (one capture)."""
    consts = {t.name for t in model.graph.initializer}
    wanted = set(anchors)
    return [n.input[0] for n in model.graph.node
            if n.name in wanted and n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in consts]


def rounded(w: np.ndarray, hessian: np.ndarray, block_size: int = 32) -> qdq.BlockInt4:
    """``gptq_block_int4`` at the defaults, kept for the last weights asked."""
    key = _digest(np.asarray(w, np.float32), hessian, text=str(block_size))
    if key not in _ROUNDED:
        if len(_ROUNDED) >= _ROUNDED_KEEP:
            _ROUNDED.clear()
        _ROUNDED[key] = gptq_block_int4(w, hessian, block_size)
    return _ROUNDED[key]


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1: row i holds the error-spreading weights
    of input row i over the rows after it. Inputs never seen (zero diagonal) get 1: rounded alone."""
    h = h.astype(np.float64).copy()
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1.0
    live = diag[~dead]
    h[np.diag_indices_from(h)] += damp * (float(live.mean()) if live.size else 1.0)
    low = np.linalg.cholesky(h)
    inv = np.linalg.solve(low.T, np.linalg.solve(low, np.eye(h.shape[0])))  # H^-1 from its factor
    return np.linalg.cholesky(inv).T


def gptq_block_int4(w: np.ndarray, hessian: np.ndarray, block_size: int = 32, damp: float = DAMP,
                    act_order: bool = True) -> qdq.BlockInt4:
    """GPTQ rounding of a [K, N] MatMul weight onto MatMulNBits' asymmetric uint4 block grid.

    ``act_order``: rows in order of decreasing Hessian diagonal (the most-used inputs first, while
    the most rows are left to absorb their error), with every block's scale and zero point fixed
    beforehand from the unrounded weights (the blocks stay contiguous along K, as MatMulNBits reads them).
    """
    w = np.asarray(w, np.float32)
    k, n = w.shape
    kb = -(-k // block_size)
    kp = kb * block_size
    weight = np.zeros((n, kp), np.float64)  # rows: output channels; columns: the K rows GPTQ walks
    weight[:, :k] = w.T
    h = np.eye(kp)
    h[:k, :k] = hessian  # padding rows: identity, rounded alone (they are zero and stay exactly zero)
    scales = np.zeros((n, kb), np.float32)
    zps = np.zeros((n, kb), np.float64)
    order = np.arange(kp)
    if act_order:
        s, z = qdq.int4_block_params(weight.reshape(n, kb, block_size).astype(np.float32))
        scales[:], zps[:] = s, z
        order = np.argsort(-np.diag(h), kind="stable")
        weight, h = weight[:, order], h[np.ix_(order, order)]
    hinv = _inverse_cholesky(h, damp)
    codes = np.zeros((n, kp), np.float64)
    lazy = max(LAZY // block_size, 1) * block_size
    for i1 in range(0, kp, lazy):
        i2 = min(i1 + lazy, kp)
        part, err = weight[:, i1:i2].copy(), np.zeros((n, i2 - i1))
        hp = hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            b = order[i1 + j] // block_size
            if not act_order and (i1 + j) % block_size == 0:  # a block's grid from its weights as moved so far
                s, z = qdq.int4_block_params(part[None, :, j : j + block_size].astype(np.float32))
                scales[:, b], zps[:, b] = s[0], z[0]
            step = scales[:, b].astype(np.float64)
            q = np.clip(np.rint(part[:, j] / step) + zps[:, b], 0, 15)
            codes[:, order[i1 + j]] = q
            e = (part[:, j] - (q - zps[:, b]) * step) / hp[j, j]
            part[:, j:] -= np.outer(e, hp[j, j:])
            err[:, j] = e
        weight[:, i2:] -= err @ hinv[i1:i2, i2:]
    return qdq.pack_block_int4(codes.reshape(n, kb, block_size), scales, zps, k, block_size)


def output_error(w: np.ndarray, w_q: np.ndarray, hessian: np.ndarray) -> float:
    """||X (W - W_q)||^2 / ||X W||^2 from H = X^T X: the layer's relative output error on its data."""
    d = (np.asarray(w_q, np.float64) - w).astype(np.float64)
    w64 = np.asarray(w, np.float64)
    return float(np.einsum("kn,kj,jn->", d, hessian, d) / max(np.einsum("kn,kj,jn->", w64, hessian, w64), 1e-300))
