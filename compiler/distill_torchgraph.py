"""Run an ONNX graph with torch ops, so end-to-end distillation can backpropagate through it.

The student of ``--distill e2e`` is the exported graph itself (BatchNorm folded,
layers fused exactly as the lowering sees them), so the weights it learns map
one to one onto the initializers the target quantises. ``weight_fn`` and
``entry_fn`` let QAT swap in fake-quantised weights and layer inputs. The ops
cover what torch exporters emit for CNNs and transformers; an op outside the
set is named in the error.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from dscompile.compiler.distill_ops import LayerOp, attrs
from dscompile.errors import InputError

Tensor = torch.Tensor
_DTYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64,
           2: torch.uint8, 3: torch.int8}


def _ints(t: Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _binary(fn):
    return lambda n, a, x: [fn(x[0], x[1])]


def _div(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _reduce(fn):
    def run(n, a, x):
        axes = a.get("axes") if "axes" in a else (_ints(x[1]) if len(x) > 1 and x[1] is not None else None)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return [x[0]]
            axes = list(range(x[0].dim()))
        return [fn(x[0], axes, keep)]
    return run


def _reshape(n, a, x):
    shape = _ints(x[1])
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x[0].reshape(shape)]


def _squeeze(n, a, x):
    axes = a.get("axes") or _ints(x[1] if len(x) > 1 else None)
    if not axes:
        return [x[0].squeeze()]
    out = x[0]
    for ax in sorted((ax % out.dim() for ax in axes), reverse=True):
        out = out.squeeze(ax)
    return [out]


def _unsqueeze(n, a, x):
    axes = a.get("axes") or _ints(x[1])
    out = x[0]
    rank = out.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        out = out.unsqueeze(ax)
    return [out]


def _slice(n, a, x):
    data = x[0]
    starts, ends = _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
        ax %= data.dim()
        size = data.shape[ax]
        if st < 0:
            idx = torch.arange(*_clamp_range(s, e, st, size), st)
            data = data.index_select(ax, idx)
            continue
        s, e = _clamp_bound(s, size), _clamp_bound(e, size)
        data = data.narrow(ax, s, max(e - s, 0))[(slice(None),) * ax + (slice(None, None, st),)] if st != 1 else \
            data.narrow(ax, s, max(e - s, 0))
    return [data]


def _clamp_bound(v: int, size: int) -> int:
    v = v + size if v < 0 else v
    return min(max(v, 0), size)


def _clamp_range(s: int, e: int, st: int, size: int) -> tuple[int, int]:
    s = s + size if s < 0 else s
    e = e + size if e < 0 else e
    return min(max(s, -1), size - 1), min(max(e, -1), size - 1)


def _split(n, a, x):
    axis = a.get("axis", 0)
    sizes = _ints(x[1]) if len(x) > 1 and x[1] is not None else a.get("split")
    if not sizes:
        parts = a.get("num_outputs", len(n.output))
        size = x[0].shape[axis]
        sizes = [-(-size // parts)] * (parts - 1)
        sizes.append(size - sum(sizes))
    return list(torch.split(x[0], sizes, axis))


def _gather(n, a, x):
    axis = a.get("axis", 0) % x[0].dim()
    idx = x[1].long()
    idx = torch.where(idx < 0, idx + x[0].shape[axis], idx)
    out = x[0].index_select(axis, idx.reshape(-1))
    return [out.reshape(*x[0].shape[:axis], *idx.shape, *x[0].shape[axis + 1:])]


def _pool(kind: str):
    def run(n, a, x):
        nd = x[0].dim() - 2
        k = a["kernel_shape"]
        strides = a.get("strides", [1] * nd)
        p = LayerOp("Conv", a).pads(tuple(x[0].shape), (0, 0, *k))
        if kind == "max":
            xp = _pad(x[0], p, -math.inf)
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
            return [fn(xp, k, strides, 0, a.get("dilations", [1] * nd), bool(a.get("ceil_mode", 0)))]
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
        if a.get("count_include_pad", 0) or not any(b or e for b, e in p):
            return [fn(_pad(x[0], p, 0.0), k, strides, 0, bool(a.get("ceil_mode", 0)))]
        ones = torch.ones_like(x[0][:1, :1])
        num = fn(_pad(x[0], p, 0.0), k, strides, 0, bool(a.get("ceil_mode", 0)))
        den = fn(_pad(ones, p, 0.0), k, strides, 0, bool(a.get("ceil_mode", 0)))
        return [num / den]
    return run


def _pad(x: Tensor, pads: list[tuple[int, int]], value: float) -> Tensor:
    flat: list[int] = []
    for b, e in reversed(pads):
        flat += [b, e]
    return F.pad(x, flat, value=value) if any(flat) else x


def _pad_op(n, a, x):
    p = _ints(x[1])
    half = len(p) // 2
    value = float(x[2].item()) if len(x) > 2 and x[2] is not None else 0.0
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    flat: list[int] = []
    for i in reversed(range(half)):
        flat += [p[i], p[i + half]]
    return [F.pad(x[0], flat, mode=mode, value=value) if mode == "constant" else F.pad(x[0], flat, mode=mode)]


def _layer_norm(n, a, x):
    axis = a.get("axis", -1) % x[0].dim()
    shape = x[0].shape[axis:]
    w = x[1].expand(shape) if x[1] is not None else None
    b = x[2].expand(shape) if len(x) > 2 and x[2] is not None else None
    return [F.layer_norm(x[0], shape, w, b, a.get("epsilon", 1e-5))]


def _batch_norm(n, a, x):
    return [F.batch_norm(x[0], x[3], x[4], x[1], x[2], False, 0.0, a.get("epsilon", 1e-5))]


def _softmax(fn):
    def run(n, a, x):
        return [fn(x[0], a.get("axis", -1))]
    return run


def _clip(n, a, x):
    lo = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
    hi = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
    return [torch.clamp(x[0], lo, hi)]


def _constant(n, a, x):
    for key, val in a.items():
        if key == "value":
            return [torch.from_numpy(numpy_helper.to_array(val).copy())]
        if key in ("value_float", "value_int"):
            return [torch.tensor(val)]
        if key in ("value_floats", "value_ints"):
            return [torch.tensor(list(val))]
    raise InputError(f"Constant {n.name!r} has no value this runner reads")


def _cast(n, a, x):
    return [x[0].to(_DTYPES.get(a["to"], torch.float32))]


def _gemm(n, a, x):
    return [LayerOp("Gemm", a).forward(x[0], x[1], x[2] if len(x) > 2 else None)]


def _flatten(n, a, x):
    axis = a.get("axis", 1) % max(x[0].dim(), 1)
    return [x[0].reshape(int(np.prod(x[0].shape[:axis])), -1)]


def _concat(n, a, x):
    return [torch.cat([t for t in x if t is not None], a["axis"])]


def _expand(n, a, x):
    shape = _ints(x[1])
    rank = max(len(shape), x[0].dim())
    shape = [1] * (rank - len(shape)) + shape
    src = [1] * (rank - x[0].dim()) + list(x[0].shape)
    return [x[0].reshape(src).expand([max(s, d) if s == 1 or d != 1 else s for s, d in zip(shape, src, strict=True)])]


def _gelu(n, a, x):
    approx = a.get("approximate", b"none")
    return [F.gelu(x[0], approximate="tanh" if approx in (b"tanh", "tanh") else "none")]


OPS: dict[str, Callable] = {
    "Identity": lambda n, a, x: [x[0]], "Dropout": lambda n, a, x: [x[0]],
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _binary(_div),
    "Pow": _binary(torch.pow), "MatMul": _binary(torch.matmul), "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt), "Greater": _binary(torch.gt), "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or), "Max": lambda n, a, x: [torch.stack(torch.broadcast_tensors(*x)).amax(0)],
    "Min": lambda n, a, x: [torch.stack(torch.broadcast_tensors(*x)).amin(0)],
    "Where": lambda n, a, x: [torch.where(x[0].bool(), x[1], x[2])],
    "Not": lambda n, a, x: [torch.logical_not(x[0])],
    "Sqrt": lambda n, a, x: [torch.sqrt(x[0])], "Exp": lambda n, a, x: [torch.exp(x[0])],
    "Log": lambda n, a, x: [torch.log(x[0])], "Neg": lambda n, a, x: [-x[0]], "Abs": lambda n, a, x: [x[0].abs()],
    "Reciprocal": lambda n, a, x: [1.0 / x[0]], "Erf": lambda n, a, x: [torch.erf(x[0])],
    "Tanh": lambda n, a, x: [torch.tanh(x[0])], "Sigmoid": lambda n, a, x: [torch.sigmoid(x[0])],
    "Relu": lambda n, a, x: [F.relu(x[0])], "LeakyRelu": lambda n, a, x: [F.leaky_relu(x[0], a.get("alpha", 0.01))],
    "Softplus": lambda n, a, x: [F.softplus(x[0])], "Gelu": _gelu,
    "PRelu": lambda n, a, x: [torch.where(x[0] < 0, x[0] * x[1], x[0])],
    "HardSigmoid": lambda n, a, x: [torch.clamp(a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5), 0, 1)],
    "HardSwish": lambda n, a, x: [F.hardswish(x[0])], "Clip": _clip,
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "Conv": lambda n, a, x: [LayerOp("Conv", a).forward(x[0], x[1], x[2] if len(x) > 2 else None)],
    "ConvTranspose": lambda n, a, x: [LayerOp("ConvTranspose", a).forward(x[0], x[1], x[2] if len(x) > 2 else None)],
    "Gemm": _gemm, "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda n, a, x: [x[0].mean(tuple(range(2, x[0].dim())), keepdim=True)],
    "GlobalMaxPool": lambda n, a, x: [x[0].amax(tuple(range(2, x[0].dim())), keepdim=True)],
    "Flatten": _flatten, "Reshape": _reshape, "Transpose": lambda n, a, x: [x[0].permute(a["perm"])],
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Concat": _concat, "Split": _split, "Slice": _slice,
    "Gather": _gather, "Expand": _expand, "Tile": lambda n, a, x: [x[0].repeat(_ints(x[1]))],
    "Shape": lambda n, a, x: [torch.tensor(list(x[0].shape)[a.get("start", 0):a.get("end")], dtype=torch.int64)],
    "Size": lambda n, a, x: [torch.tensor(x[0].numel(), dtype=torch.int64)],
    "Cast": _cast, "Constant": _constant,
    "ConstantOfShape": lambda n, a, x: [
        torch.full(_ints(x[0]), float(numpy_helper.to_array(a["value"]).reshape(-1)[0]) if "value" in a else 0.0)],
    "Range": lambda n, a, x: [torch.arange(x[0].item(), x[1].item(), x[2].item())],
    "ReduceMean": _reduce(lambda t, ax, k: t.mean(ax, keepdim=k)), "ReduceSum": _reduce(lambda t, ax, k: t.sum(ax, keepdim=k)),
    "ReduceMax": _reduce(lambda t, ax, k: t.amax(ax, keepdim=k)), "ReduceMin": _reduce(lambda t, ax, k: t.amin(ax, keepdim=k)),
    "Pad": _pad_op,
}


class TorchGraph(torch.nn.Module):
    """An ONNX graph evaluated with torch. Float initializers are buffers; ``weight_fn`` maps an
    initializer name to a function giving the tensor to use, ``entry_fn`` a node name to a function
    applied to its first input (the activation entry of a quantised layer)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        unsupported = sorted({n.op_type for n in model.graph.node if n.op_type not in OPS or n.domain not in ("", "ai.onnx")})
        if unsupported:
            raise InputError(f"end-to-end distillation cannot train through {', '.join(unsupported)} "
                             "(use --distill layer, which works on any ONNX model)")
        self.nodes = [copy.deepcopy(n) for n in model.graph.node]  # QAT may rewire its own copy
        self.attrs = [attrs(n) for n in self.nodes]
        self.consts = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
        self.outputs = [o.name for o in model.graph.output]
        self.weight_fn: dict[str, Callable[[], Tensor]] = {}
        self.entry_fn: dict[str, Callable[[Tensor], Tensor]] = {}

    def forward(self, feed: dict[str, Tensor], keep: tuple[str, ...] = ()) -> tuple[list[Tensor], dict[str, Tensor]]:
        env: dict[str, Tensor] = dict(feed)
        for name, fn in self.weight_fn.items():
            env[name] = fn()
        kept: dict[str, Tensor] = {}
        for node, a in zip(self.nodes, self.attrs, strict=True):
            xs = [self._get(env, i) for i in node.input]
            if node.name in self.entry_fn:
                xs[0] = self.entry_fn[node.name](xs[0])
            outs = OPS[node.op_type](node, a, xs)
            for name, value in zip(node.output, outs, strict=False):
                env[name] = value
                if name in keep:
                    kept[name] = value
        return [env[o] for o in self.outputs], kept

    def _get(self, env: dict[str, Tensor], name: str) -> Tensor | None:
        if not name:
            return None
        return env[name] if name in env else self.consts[name]
