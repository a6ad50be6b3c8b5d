"""TensorRT rule checker: what of an ONNX graph the board's TensorRT would reject, change or slow down.

The rules are data (``rules/tensorrt_ops.toml``: the ONNX parser's operator matrix per TensorRT
series; ``rules/tensorrt_qdq.toml``: explicit-quantization rules with severities and sources);
the functions here apply them node by node and return findings, each naming the node, its op,
the rule, what happens and what to do about it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from dscompile.compiler.layers import GraphIndex
from dscompile.targets.tensorrt_versions import TensorRTRelease, load_rules

SEVERITIES = ("error", "warning", "advice")
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_ZP_TYPES = {TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.INT4: "int4",
             TensorProto.UINT4: "uint4", TensorProto.INT32: "int32", TensorProto.INT16: "int16"}


@dataclass(frozen=True)
class Finding:
    node: str
    op: str
    rule: str
    severity: str  # error | warning | advice
    message: str
    fallback: str = ""
    source: str = ""

    def line(self, release: TensorRTRelease) -> str:
        tail = f"; {self.fallback}" if self.fallback else ""
        return f"node {self.node!r} ({self.op}) on {release.label}: {self.message}{tail}"

    def to_json(self) -> dict[str, str]:
        d = {"node": self.node, "op": self.op, "rule": self.rule, "severity": self.severity,
             "message": self.message, "source": self.source}
        if self.fallback:
            d["fallback"] = self.fallback
        return d


@dataclass(frozen=True)
class RuleReport:
    release: TensorRTRelease
    findings: tuple[Finding, ...]
    nodes_checked: int
    dla: dict[str, Any] | None = field(default=None)

    def by_severity(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    def to_json(self) -> dict[str, Any]:
        counts = {s: len(self.by_severity(s)) for s in SEVERITIES}
        d: dict[str, Any] = {
            "tensorrt": self.release.to_json(), "nodes_checked": self.nodes_checked, "counts": counts,
            "findings": [f.to_json() for f in self.findings],
            "sources": {
                "ops": load_rules("tensorrt_ops")["series"][self.release.series]["source"],
                "qdq": "rules/tensorrt_qdq.toml (each finding names its source)",
            },
        }
        if self.dla is not None:
            d["dla"] = self.dla
        return d


def _rule(rule_id: str) -> dict[str, Any]:
    return load_rules("tensorrt_qdq")["rules"][rule_id]


def _finding(node: onnx.NodeProto, rule_id: str, detail: str = "", fallback: str = "") -> Finding:
    r = _rule(rule_id)
    msg = r["message"] + (f" ({detail})" if detail else "")
    return Finding(node.name or node.output[0], node.op_type, rule_id, r["severity"], msg, fallback, r["source"])


def _applies(rule_id: str, release: TensorRTRelease) -> bool:
    series = _rule(rule_id).get("series")
    return series is None or release.series in series


def check_ops(model: onnx.ModelProto, release: TensorRTRelease) -> Iterator[Finding]:
    """Every node against the parser's operator matrix of this TensorRT series."""
    table = load_rules("tensorrt_ops")
    ops = table["series"][release.series]["ops"]
    fallbacks = table["fallbacks"]
    source = table["series"][release.series]["source"]
    for node in model.graph.node:
        fallback = "fallback: " + fallbacks.get(node.op_type, fallbacks["default"])
        name = node.name or node.output[0]
        if node.domain not in ("", "ai.onnx"):
            msg = f"custom-domain op {node.domain}::{node.op_type} has no TensorRT importer"
            yield Finding(name, node.op_type, "op_support", "error", msg, fallback, source)
        elif node.op_type not in ops:
            msg = "not in the TensorRT ONNX parser's operator matrix"
            yield Finding(name, node.op_type, "op_support", "error", msg, fallback, source)
        elif not ops[node.op_type]["supported"]:
            msg = "not supported by the TensorRT ONNX parser"
            yield Finding(name, node.op_type, "op_support", "error", msg, fallback, source)


def check_opset(model: onnx.ModelProto, release: TensorRTRelease) -> Iterator[Finding]:
    max_opset = load_rules("tensorrt_ops")["series"][release.series]["max_opset"]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset > max_opset:
        r = _rule("opset_range")
        msg = f"{r['message']} (model opset {opset}, parser written for up to {max_opset})"
        yield Finding("<model>", "opset", "opset_range", r["severity"], msg, "", r["source"])


def _const(index: GraphIndex, name: str) -> np.ndarray | None:
    if name in index.initializers:
        return numpy_helper.to_array(index.initializers[name])
    p = index.producer.get(name)
    if p is not None and p.op_type == "Constant":
        attr = next((a for a in p.attribute if a.name == "value"), None)
        return numpy_helper.to_array(attr.t) if attr is not None else None
    return None


def _const_type(index: GraphIndex, name: str) -> int | None:
    if name in index.initializers:
        return index.initializers[name].data_type
    p = index.producer.get(name)
    if p is not None and p.op_type == "Constant":
        attr = next((a for a in p.attribute if a.name == "value"), None)
        return attr.t.data_type if attr is not None else None
    return None


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else onnx.helper.get_attribute_value(a)


def check_qdq_node(node: onnx.NodeProto, index: GraphIndex, release: TensorRTRelease) -> Iterator[Finding]:
    """One QuantizeLinear/DequantizeLinear node against TensorRT's explicit-quantization rules."""
    zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zp_name is None and _applies("qdq_zero_point_present", release):
        yield _finding(node, "qdq_zero_point_present")
    qtype = _quant_type(node, index, zp_name)
    allowed = _rule("qdq_type")["allowed"][release.series]
    if qtype == "int32":
        yield _finding(node, "qdq_int32_bias", f"input {node.input[0]!r}")
    elif qtype == "int4" and not release.int4_weights:
        yield _finding(node, "qdq_int4_series")
    elif qtype not in allowed:
        yield _finding(node, "qdq_type", f"{qtype}; allowed here: {', '.join(allowed)}")
    if zp_name is not None:
        zp = _const(index, zp_name)
        if zp is not None and np.any(zp.astype(np.int64) != 0):
            yield _finding(node, "qdq_zero_point", f"{zp_name!r} holds {np.unique(zp)[:4].tolist()}")
    scale = _const(index, node.input[1])
    if scale is None or not np.all(scale > 0):
        yield _finding(node, "qdq_scale_constant_positive", f"scale {node.input[1]!r}")
        return
    yield from _check_granularity(node, index, scale, qtype)


def _quant_type(node: onnx.NodeProto, index: GraphIndex, zp_name: str | None) -> str:
    if zp_name is not None:
        t = _const_type(index, zp_name)
        return _ZP_TYPES.get(t, "unknown") if t is not None else "unknown"
    out_dtype = _attr(node, "output_dtype", 0)
    if node.op_type == "DequantizeLinear":
        t = _const_type(index, node.input[0])
        if t is not None:
            return _ZP_TYPES.get(t, "unknown")
    return _ZP_TYPES.get(out_dtype, "uint8")  # ONNX default without a zero point is uint8


def _check_granularity(node: onnx.NodeProto, index: GraphIndex, scale: np.ndarray, qtype: str) -> Iterator[Finding]:
    if scale.size <= 1:
        return
    data = _const(index, node.input[0]) if node.op_type == "DequantizeLinear" else None
    if data is None:
        if not index.is_constant(node.input[0]):
            yield _finding(node, "qdq_per_axis_activation", f"scale has {scale.size} coefficients")
        return
    axis = _attr(node, "axis", 1) % max(data.ndim, 1)
    if scale.ndim == 1 and scale.size != data.shape[axis]:
        yield _finding(node, "qdq_per_channel_length", f"{scale.size} scales for {data.shape[axis]} channels on axis {axis}")
    elif scale.ndim > 1:
        blocked = [i for i in range(data.ndim) if scale.shape[i] != data.shape[i]] if scale.ndim == data.ndim else None
        odd_int4 = qtype == "int4" and data.shape[-1] % 2 == 1
        if blocked is None or len(blocked) != 1 or odd_int4:
            yield _finding(node, "qdq_block_shape", f"data {list(data.shape)}, scale {list(scale.shape)}")


def check_qdq(model: onnx.ModelProto, release: TensorRTRelease, index: GraphIndex) -> Iterator[Finding]:
    for node in model.graph.node:
        if node.op_type in _QDQ and node.domain in ("", "ai.onnx") and len(node.input) >= 2:
            yield from check_qdq_node(node, index, release)


def dq_source(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    """The DequantizeLinear producing ``tensor`` (through a Cast), if any."""
    p = index.producer.get(tensor)
    if p is not None and p.op_type == "Cast":
        p = index.producer.get(p.input[0])
    return p if p is not None and p.op_type == "DequantizeLinear" else None


def int8_anchor(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """A Conv/Gemm/MatMul whose operands all arrive through DequantizeLinear (TensorRT runs it in INT8)."""
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
        return False
    return all(dq_source(index, t) is not None for t in node.input[:2])


def check_advice(model: onnx.ModelProto, index: GraphIndex, shapes: dict[str, tuple[int, ...]]) -> Iterator[Finding]:
    """Where INT8 Q/DQ costs speed on TensorRT (Model Optimizer's exclusion rules, as data)."""
    graph_inputs = {i.name for i in model.graph.input}
    for node in model.graph.node:
        if not int8_anchor(node, index):
            continue
        w_dq = dq_source(index, node.input[1])
        w = _const(index, w_dq.input[0]) if w_dq is not None else None
        if node.op_type == "Conv" and w is not None and w.ndim >= 3:
            if _small_conv(node, w, graph_inputs, index):
                yield _finding(node, "int8_conv_small_channels", f"{w.shape[1] * _attr(node, 'group', 1)} in, {w.shape[0]} out")
        elif node.op_type in ("MatMul", "Gemm"):
            detail = gemm_int8_unfit(node, shapes)
            if detail:
                yield _finding(node, "int8_gemm_small", detail)


def _small_conv(node: onnx.NodeProto, w: np.ndarray, graph_inputs: set[str], index: GraphIndex) -> bool:
    dq = dq_source(index, node.input[0])
    q = index.producer.get(dq.input[0]) if dq is not None else None
    first = q is not None and q.input[0] in graph_inputs
    return conv_int8_unfit(w.shape, _attr(node, "group", 1), first)


def conv_int8_unfit(weight_shape: tuple[int, ...], group: int, first: bool) -> bool:
    """Model Optimizer's test for a Conv TensorRT has no fast INT8 kernel for (limits from the rules)."""
    r = _rule("int8_conv_small_channels")
    lo, mult = r["min_channels"], r["channel_multiple"]
    oc, ic = weight_shape[0], weight_shape[1] * group
    if oc >= lo and ic >= lo:
        return False
    kernel = list(weight_shape[2:])
    if group == 1 and (oc % mult == 0 or ic % mult == 0) and (first or oc >= lo or ic >= lo) and len(set(kernel)) == 1:
        return False
    return not (group > 1 and oc % mult == 0 and all(k >= 3 for k in kernel))


def gemm_int8_unfit(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> str:
    lo = _rule("int8_gemm_small")["min_dim"]
    a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
    if not a or not out or len(out) < 1:
        return ""
    k, n = a[-1], out[-1]
    m = int(np.prod(out[:-1])) if len(out) > 1 else 1
    if k < lo or n < lo:
        return f"K={k}, N={n}"
    if m == 1 or n == 1:
        return f"GEMV: M={m}, N={n}"
    return ""


def check_residual_adds(model: onnx.ModelProto, index: GraphIndex) -> Iterator[Finding]:
    """Adds fed by an INT8 layer whose other input carries no Q/DQ (TensorRT cannot fuse them)."""
    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2 or any(index.is_constant(i) for i in node.input):
            continue
        from_int8 = [_through_epilogue(index, i) for i in node.input]
        if sum(from_int8) != 1:
            continue
        other = node.input[from_int8.index(False)]
        if dq_source(index, other) is None:
            yield _finding(node, "residual_add_unquantized", f"residual input {other!r}")


def _through_epilogue(index: GraphIndex, tensor: str) -> bool:
    """``tensor`` comes from an INT8 anchor, possibly through a bias Add / BatchNorm / Relu it fuses."""
    node = index.producer.get(tensor)
    for _ in range(3):
        if node is None:
            return False
        if int8_anchor(node, index):
            return True
        if node.op_type not in ("Add", "BatchNormalization", "Relu", "Clip") or not node.input:
            return False
        if node.op_type == "Add" and not any(index.is_constant(i) for i in node.input):
            return False
        node = index.producer.get(node.input[0])
    return False


def check_model(model: onnx.ModelProto, release: TensorRTRelease, shapes: dict[str, tuple[int, ...]]) -> RuleReport:
    """Operator support, opset, Q/DQ rules and INT8 placement advice, in graph order."""
    index = GraphIndex.of(model)
    findings = [
        *check_opset(model, release), *check_ops(model, release), *check_qdq(model, release, index),
        *check_advice(model, index, shapes), *check_residual_adds(model, index),
    ]
    return RuleReport(release, tuple(findings), len(model.graph.node))
