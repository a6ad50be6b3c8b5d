"""FP16 arithmetic made observable on onnxruntime's CPU: FP16 tensors computed in FP32, rounded where produced.

onnxruntime's CPU provider has FP16 kernels for few ops. Its InsertCastTransformer (always on, even
with graph optimizations off) runs an "isolated" FP16 node -- Cast to FP16, the node, Cast back --
in FP32 and removes both Casts (``IsIsolatedFp16NodeOnCpu`` in onnxruntime/core/optimizer/
insert_cast_transformer.cc), and it drops the lossless-looking Cast pairs between FP32-fallback
nodes of an FP16 chain. Either way the FP16 rounding of activations never happens, and a model
whose layers a GPU runs in FP16 looks exactly as faithful as the FP32 one.

An explicit ``Cast(to=FLOAT16) -> Cast(to=FLOAT)`` pair survives every optimization level, so the
rewrite here keeps the model's meaning and makes the rounding explicit: every FP16 initializer and
constant becomes FP32 (exact), every node that produced an FP16 tensor computes in FP32 and its
output is rounded to FP16 and widened again under the original name. What is left out: FP16
accumulation inside a GEMM or convolution (TensorRT accumulates FP16 GEMMs in FP32 or FP16 by
kernel choice), so this is the rounding of every stored FP16 value, not of every partial sum.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

from dscompile.compiler.layers import tensor_types

_F16, _F32 = TensorProto.FLOAT16, TensorProto.FLOAT


def has_fp16(model: onnx.ModelProto) -> bool:
    g = model.graph
    return any(t.data_type == _F16 for t in g.initializer) or any(
        n.op_type == "Cast" and _attr(n, "to") == _F16 for n in g.node)


def emulate_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` that computes in FP32 and rounds each FP16 tensor where it is produced.

    Models without FP16, and models with subgraphs (If/Loop/Scan bodies are left as they are), come
    back unchanged.
    """
    if not has_fp16(model) or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                  for n in model.graph.node for a in n.attribute):
        return model
    types = tensor_types(model)  # best effort: Casts to FP16 are also found by their attribute
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for t in g.initializer:
        if t.data_type == _F16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype("float32"), t.name))
    taken = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
    nodes: list[onnx.NodeProto] = []
    head = _widen_fp16_inputs(g, taken)
    for node in g.node:
        _fp32_constants(node)
        rounded = []
        for i, name in enumerate(node.output):
            if name and (types.get(name) == _F16 or (node.op_type == "Cast" and _attr(node, "to") == _F16)):
                raw = _fresh(f"{name}_fp32", taken)
                node.output[i] = raw
                rounded.append((raw, name))
        nodes.append(node)
        for raw, name in rounded:
            half = _fresh(f"{name}_rounded_fp16", taken)
            nodes.append(helper.make_node("Cast", [raw], [half], name=_fresh(f"{name}_ToFp16", taken), to=_F16))
            nodes.append(helper.make_node("Cast", [half], [name], name=_fresh(f"{name}_ToFp32", taken), to=_F32))
    del g.node[:]
    g.node.extend([*head, *nodes])
    g.node.extend(_narrow_fp16_outputs(g, taken))
    del g.value_info[:]
    return out


def _widen_fp16_inputs(g: onnx.GraphProto, taken: set[str]) -> list[onnx.NodeProto]:
    """FP16 graph inputs stay FP16 for the caller; the graph reads them widened."""
    head = []
    for vi in g.input:
        if vi.type.tensor_type.elem_type == _F16:
            wide = _fresh(f"{vi.name}_fp32", taken)
            for n in g.node:
                n.input[:] = [wide if i == vi.name else i for i in n.input]
            head.append(helper.make_node("Cast", [vi.name], [wide], name=_fresh(f"{vi.name}_In", taken), to=_F32))
    return head


def _narrow_fp16_outputs(g: onnx.GraphProto, taken: set[str]) -> list[onnx.NodeProto]:
    """FP16 graph outputs are produced as FP16 again, under their own names."""
    tail = []
    for vi in g.output:
        if vi.type.tensor_type.elem_type == _F16:
            inner = _fresh(f"{vi.name}_inner", taken)
            for n in g.node:
                n.output[:] = [inner if o == vi.name else o for o in n.output]
                n.input[:] = [inner if i == vi.name else i for i in n.input]
            tail.append(helper.make_node("Cast", [inner], [vi.name], name=_fresh(f"{vi.name}_Out", taken), to=_F16))
    return tail


def _fp32_constants(node: onnx.NodeProto) -> None:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == _F16:
            a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype("float32"), a.t.name))


def _attr(node: onnx.NodeProto, name: str) -> int | None:
    a = next((a for a in node.attribute if a.name == name), None)
    return None if a is None else helper.get_attribute_value(a)


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name
