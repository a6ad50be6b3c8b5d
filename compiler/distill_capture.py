"""onnxruntime captures for distillation: intermediate tensors of the FP32 model and of the
fake-quantised student, and the student's held-out error against FP32.

The student is the source graph with each planned layer's weight replaced by its
quantised (on-grid) float value and a fake-quantiser (float Div/Round/Clip/Mul,
or DynamicQuantizeLinear for int8_dynamic) in front of its activation input:
what the target's integer kernels compute, run in float.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dscompile.compiler.distill_quant import ActGrid
from dscompile.compiler.runtime import ort_session, run_session
from dscompile.compiler.verify import cosine, looks_like_scores

Feed = dict[str, np.ndarray]


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the named intermediate tensors."""
    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
            have.add(n)
    return m


def prefix(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Only the nodes the named tensors depend on, with those tensors as the outputs: onnxruntime
    runs every node of a session whatever is fetched, so capturing early layers gets cheaper."""
    need, keep = set(names), []
    for node in reversed(model.graph.node):
        if need.intersection(node.output):
            keep.append(node)
            need.update(i for i in node.input if i)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.node[:]
    m.graph.node.extend(reversed(keep))
    used = {i for n in keep for i in n.input}
    inits = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    del m.graph.output[:]
    return m


class Capturer:
    """One onnxruntime session over a model that exposes extra tensors; ``run`` stacks them over feeds.

    ``truncate`` drops every node the named tensors do not depend on (the model's outputs included)."""

    def __init__(self, model: onnx.ModelProto, names: Sequence[str], threads: int | None = None,
                 truncate: bool = False) -> None:
        self.names = list(dict.fromkeys(names))
        self.session = ort_session(with_outputs(prefix(model, self.names) if truncate else model, self.names),
                                   threads, optimize=False)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Sequence[Feed], names: Sequence[str]) -> dict[str, np.ndarray]:
        got: dict[str, list[np.ndarray]] = {n: [] for n in names}
        names_in = {i.name for i in self.session.get_inputs()}
        for feed in feeds:
            res = self.session.run(list(names), {k: v for k, v in feed.items() if k in names_in})
            for n, r in zip(names, res, strict=True):
                got[n].append(np.asarray(r, np.float32))
        return {n: np.concatenate(v, 0) for n, v in got.items()}


def student_model(
    model: onnx.ModelProto, weights: dict[str, np.ndarray],
    entries: tuple[dict[str, ActGrid], dict[str, tuple[str, ActGrid]]],
) -> onnx.ModelProto:
    """The fake-quantised student. ``weights`` replace initializers; ``entries`` holds the static
    quantisers per tensor (every consumer reads the quantised value, as with the lowering's shared
    Q/DQ pair) and the dynamic ones per node (only that node's input)."""
    tensors, nodes = entries
    m = copy.deepcopy(model)
    for t in m.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(weights[t.name].astype(numpy_helper.to_array(t).dtype), t.name))
    out: list[onnx.NodeProto] = []
    renamed: dict[str, str] = {}
    for name in [i.name for i in m.graph.input if i.name in tensors]:
        renamed[name] = f"{name}__distill_fq"
        out.extend(_fake_quant_nodes(m, name, renamed[name], tensors[name], f"in_{len(renamed)}"))
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        if node.name in nodes:
            x, grid = nodes[node.name]
            qx = f"{x}__distill_dyn_{node.name}"
            out.extend(_fake_quant_nodes(m, node.input[0], qx, grid, f"dyn_{node.name}"))
            node.input[0] = qx
        out.append(node)
        for name in node.output:
            if name in tensors and name not in {o.name for o in m.graph.output}:
                renamed[name] = f"{name}__distill_fq"
                out.extend(_fake_quant_nodes(m, name, renamed[name], tensors[name], f"t_{len(renamed)}"))
    del m.graph.node[:]
    m.graph.node.extend(out)
    return m


def _fake_quant_nodes(m: onnx.ModelProto, x: str, out: str, g: ActGrid, tag: str) -> list[onnx.NodeProto]:
    p = f"__distill_{tag}"
    if g.dynamic:
        return [
            helper.make_node("DynamicQuantizeLinear", [x], [p + "_q", p + "_s", p + "_z"], name=p + "_dq"),
            helper.make_node("DequantizeLinear", [p + "_q", p + "_s", p + "_z"], [out], name=p + "_dd"),
        ]
    consts = {"_scale": g.scale, "_zp": float(g.zero_point), "_lo": float(g.qmin), "_hi": float(g.qmax)}
    for k, v in consts.items():
        m.graph.initializer.append(numpy_helper.from_array(np.array(v, np.float32), p + k))
    return [
        helper.make_node("Div", [x, p + "_scale"], [p + "_d"], name=p + "_div"),
        helper.make_node("Round", [p + "_d"], [p + "_r"], name=p + "_round"),
        helper.make_node("Add", [p + "_r", p + "_zp"], [p + "_a"], name=p + "_add"),
        helper.make_node("Clip", [p + "_a", p + "_lo", p + "_hi"], [p + "_c"], name=p + "_clip"),
        helper.make_node("Sub", [p + "_c", p + "_zp"], [p + "_s"], name=p + "_sub"),
        helper.make_node("Mul", [p + "_s", p + "_scale"], [out], name=p + "_mul"),
    ]


def run_outputs(model: onnx.ModelProto, feeds: Sequence[Feed], threads: int | None = None) -> list[list[np.ndarray]]:
    sess = ort_session(model, threads, optimize=False)
    return [run_session(sess, f) for f in feeds]


def output_error(reference: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> dict[str, float | None]:
    """Held-out error of a student against FP32: normalised MSE (the decision metric), cosine, top-1."""
    num = den = 0.0
    cos: list[float] = []
    agree = rows = 0
    for ref, out in zip(reference, got, strict=True):
        for r, g in zip(ref, out, strict=True):
            if not np.issubdtype(r.dtype, np.floating):
                continue
            r64, g64 = r.astype(np.float64), np.asarray(g, np.float64).reshape(r.shape)
            num += float(np.sum((r64 - g64) ** 2))
            den += float(np.sum(r64 ** 2))
            cos.append(cosine(r64, g64))
            if looks_like_scores(r):
                agree += int(np.sum(r64.reshape(-1, r.shape[-1]).argmax(-1) == g64.reshape(-1, r.shape[-1]).argmax(-1)))
                rows += int(np.prod(r.shape[:-1])) if r.ndim > 1 else 1
    return {
        "nmse": num / max(den, 1e-30),
        "cosine": float(np.mean(cos)) if cos else 1.0,
        "top1_agreement": agree / rows if rows else None,
    }
