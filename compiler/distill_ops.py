"""Quantisable ONNX layers (Conv, ConvTranspose, MatMul, Gemm) re-implemented in torch.

A ``LayerOp`` holds one anchor node's attributes and computes it with the
weight and bias passed in, so reconstruction can swap a soft-rounded weight in.
A layer may carry a bias ``Add`` and an elementwise activation after its anchor
(the fused group DMPQ plans as one unit); reconstruction targets the
activation's output, bias correction the pre-activation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from dscompile.errors import InputError

ANCHORS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish")


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@dataclass
class LayerOp:
    """One anchor op with its attributes; ``forward(x, w, b)``."""

    op: str
    attrs: dict = field(default_factory=dict)

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.op == "Conv":
            return self._conv(x, w, b)
        if self.op == "ConvTranspose":
            return self._conv_transpose(x, w, b)
        if self.op == "Gemm":
            a = self.attrs
            x2 = x.t() if a.get("transA", 0) else x
            w2 = w.t() if a.get("transB", 0) else w
            y = a.get("alpha", 1.0) * (x2 @ w2)
            return y + a.get("beta", 1.0) * b if b is not None else y
        y = x @ w  # MatMul with the weight as its second input
        return y + b if b is not None else y

    def pads(self, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> list[tuple[int, int]]:
        """(begin, end) padding per spatial axis of a Conv, resolving auto_pad."""
        a = self.attrs
        nd = len(w_shape) - 2
        strides = a.get("strides", [1] * nd)
        dil = a.get("dilations", [1] * nd)
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            out = []
            for i in range(nd):
                size = x_shape[2 + i]
                total = max((-(-size // strides[i]) - 1) * strides[i] + (w_shape[2 + i] - 1) * dil[i] + 1 - size, 0)
                small = total // 2
                out.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
            return out
        if auto == "VALID":
            return [(0, 0)] * nd
        p = a.get("pads", [0] * (2 * nd))
        return [(p[i], p[i + nd]) for i in range(nd)]

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, padded: bool = False) -> torch.Tensor:
        a = self.attrs
        nd = w.dim() - 2
        if not padded:
            x = pad_input(x, self.pads(tuple(x.shape), tuple(w.shape)))
        fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        return fn(x, w, b, a.get("strides", [1] * nd), 0, a.get("dilations", [1] * nd), a.get("group", 1))

    def conv_padded(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """Conv of an input that already carries its padding (a crop of the padded input)."""
        return self._conv(x, w, b, padded=True)

    def _conv_transpose(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        a = self.attrs
        nd = w.dim() - 2
        if "output_shape" in a or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise InputError("ConvTranspose with output_shape/auto_pad is not supported by reconstruction")
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
        y = fn(x, w, b, a.get("strides", [1] * nd), 0, a.get("output_padding", [0] * nd), a.get("group", 1),
               a.get("dilations", [1] * nd))
        p = a.get("pads", [0] * (2 * nd))
        index = [slice(None), slice(None)] + [slice(p[i], y.shape[2 + i] - p[i + nd]) for i in range(nd)]
        return y[tuple(index)]


def pad_input(x: torch.Tensor, pads: list[tuple[int, int]]) -> torch.Tensor:
    if not any(b or e for b, e in pads):
        return x
    flat: list[int] = []
    for b, e in reversed(pads):
        flat += [b, e]
    return F.pad(x, flat)


def activation(node: onnx.NodeProto, consts: dict[str, np.ndarray]):
    """A torch function for one elementwise activation node."""
    a = attrs(node)
    if node.op_type == "Relu":
        return F.relu
    if node.op_type == "Clip":
        lo = _const(node, 1, consts, a.get("min"))
        hi = _const(node, 2, consts, a.get("max"))
        return lambda t: torch.clamp(t, lo, hi)
    if node.op_type == "LeakyRelu":
        return lambda t: F.leaky_relu(t, a.get("alpha", 0.01))
    if node.op_type == "HardSigmoid":
        return lambda t: torch.clamp(a.get("alpha", 0.2) * t + a.get("beta", 0.5), 0, 1)
    return {"Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "HardSwish": F.hardswish}[node.op_type]


def _const(node: onnx.NodeProto, i: int, consts: dict[str, np.ndarray], default):
    if len(node.input) > i and node.input[i]:
        if node.input[i] not in consts:
            raise InputError(f"{node.name}: Clip bound {node.input[i]!r} is not a constant")
        return float(consts[node.input[i]])
    return default


@dataclass
class LayerSpec:
    """One quantised layer as reconstruction sees it (names are ONNX tensor/initializer names)."""

    name: str
    anchor: onnx.NodeProto
    weight: str
    bias: str | None  # initializer holding the bias (Conv/Gemm input, or the Add after MatMul)
    bias_node: onnx.NodeProto | None  # the Add carrying a MatMul's bias
    acts: list[onnx.NodeProto]
    x: str  # activation input
    pre: str  # pre-activation output (anchor + bias)
    y: str  # reconstruction target (after the activations)
    op: LayerOp = field(default_factory=lambda: LayerOp("Conv"))

    @property
    def trans_b(self) -> bool:
        return bool(attrs(self.anchor).get("transB", 0))


def layer_spec(model: onnx.ModelProto, name: str, nodes: tuple[str, ...]) -> LayerSpec | None:
    """The reconstructable part of a planned layer: its anchor with a weight initializer, bias, activations.

    None when the layer's anchor is not one of ANCHORS with a constant weight.
    """
    inits = {t.name for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    members = [by_name[n] for n in nodes if n in by_name]
    anchor = next((n for n in members if n.op_type in ANCHORS and len(n.input) > 1 and n.input[1] in inits), None)
    if anchor is None or anchor.input[0] in inits:
        return None
    consumers = _consumers(model)
    member_names = {n.name for n in members}
    bias = anchor.input[2] if len(anchor.input) > 2 and anchor.input[2] in inits else None
    bias_node, out = None, anchor.output[0]
    nxt = _single_consumer(consumers, out, member_names)
    if anchor.op_type == "MatMul" and nxt is not None and nxt.op_type == "Add":
        other = [i for i in nxt.input if i != out]
        if other and other[0] in inits:
            bias_node, bias, out = nxt, other[0], nxt.output[0]
            nxt = _single_consumer(consumers, out, member_names)
    pre, acts = out, []
    while nxt is not None and nxt.op_type in ACTIVATIONS:
        acts.append(nxt)
        out = nxt.output[0]
        nxt = _single_consumer(consumers, out, member_names)
    return LayerSpec(name, anchor, anchor.input[1], bias, bias_node, acts, anchor.input[0], pre, out,
                     LayerOp(anchor.op_type, attrs(anchor)))


def count_anchor_layers(model: onnx.ModelProto) -> int:
    inits = {t.name for t in model.graph.initializer}
    return sum(n.op_type in ANCHORS and len(n.input) > 1 and n.input[1] in inits for n in model.graph.node)


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _single_consumer(consumers: dict, tensor: str, members: set[str]) -> onnx.NodeProto | None:
    users = consumers.get(tensor, [])
    if len(users) == 1 and users[0].name in members:
        return users[0]
    return None


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise InputError(f"initializer {name!r} not found")


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs small enough to read as scalars."""
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if int(np.prod(t.dims)) <= 16}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


class LayerModel(torch.nn.Module):
    """A planned layer in torch: optional entry quantiser, the anchor, bias, activations."""

    def __init__(self, spec: LayerSpec, consts: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.spec = spec
        self.acts = [activation(n, consts) for n in spec.acts]

    def pre(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, padded: bool = False) -> torch.Tensor:
        if self.spec.bias_node is not None:  # MatMul + Add: bias added after, broadcasting as ONNX does
            y = self.spec.op.forward(x, w, None)
            return y + b if b is not None else y
        if padded:
            return self.spec.op.conv_padded(x, w, b)
        return self.spec.op.forward(x, w, b)

    def post(self, y: torch.Tensor) -> torch.Tensor:
        for f in self.acts:
            y = f(y)
        return y
