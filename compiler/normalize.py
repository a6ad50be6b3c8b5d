"""Make a model ready for quantised lowering: unique node names, opset >= 13.

Both steps are deterministic, so a plan made on one run names the same nodes
as the build on the next. Quantised graphs need opset 13 (per-channel
DequantizeLinear); older models are upgraded with onnx's version converter.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from dscompile.compiler.graph import ModelGraph
from dscompile.errors import InputError

MIN_OPSET = 13


def onnx_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed or duplicate node a stable name ``<op>_<index>`` (in place)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name
        if not name or name in seen:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
        seen.add(name)
    return model


def upgrade_opset(model: onnx.ModelProto, version: int = MIN_OPSET) -> onnx.ModelProto:
    if onnx_opset(model) >= version:
        return model
    try:
        from onnx import version_converter

        return version_converter.convert_version(model, version)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot upgrade the model from opset {onnx_opset(model)} to {version}: {text}") from None


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold inference BatchNormalization into the Conv before it (in place).

    Runtimes do this themselves only while the weight is a constant; once a
    weight is quantised (DequantizeLinear in front) they cannot, and the
    BatchNormalization between Conv and QuantizeLinear would block the integer
    kernel. Folding first keeps the arithmetic identical and the pattern fusable.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    users: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    outputs = {o.name for o in g.output}
    by_input = {n.input[0]: n for n in g.node if n.op_type == "BatchNormalization" and n.input}
    drop = set()
    for conv in g.node:
        bn = by_input.get(conv.output[0]) if conv.op_type == "Conv" and conv.output else None
        if bn is None or users.get(conv.output[0]) != 1 or conv.output[0] in outputs or len(bn.output) != 1:
            continue
        params = [inits.get(x) for x in bn.input[1:5]]
        w = inits.get(conv.input[1]) if len(conv.input) > 1 else None
        b = inits.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        if w is None or any(p is None for p in params) or users.get(conv.input[1]) != 1:
            continue
        if any(uses_external_data(t) for t in (w, b, *params) if t is not None):
            continue  # weights kept on disk (a model past 2 GB): left unfolded, as onnxruntime folds it itself
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(p).astype(np.float64) for p in params)
        k = gamma / np.sqrt(var + eps)
        wa = numpy_helper.to_array(w).astype(np.float64)
        ba = numpy_helper.to_array(b).astype(np.float64) if b is not None else np.zeros(wa.shape[0])
        new_w = numpy_helper.from_array((wa * k.reshape(-1, *[1] * (wa.ndim - 1))).astype(np.float32), f"{conv.name}_W_bnfold")
        new_b = numpy_helper.from_array(((ba - mean) * k + beta).astype(np.float32), f"{conv.name}_B_bnfold")
        g.initializer.extend([new_w, new_b])
        del conv.input[1:]
        conv.input.extend([new_w.name, new_b.name])
        conv.output[0] = bn.output[0]
        drop.add(bn.name or id(bn))
    if drop:
        keep = [n for n in g.node if (n.name or id(n)) not in drop]
        del g.node[:]
        g.node.extend(keep)
        used = {i for n in g.node for i in n.input}
        used |= outputs | {i.name for i in g.input}
        keep_init = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep_init)
    return model


_BIASED = ("Conv", "ConvTranspose", "Gemm")  # input 2: a bias the integer lowerings read as an initializer


def weights_as_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant nodes holding float tensors of rank >= 2, or a Conv/Gemm bias, become initializers of the same name.

    Exporters such as paddle2onnx put weights in Constant nodes (PP-OCRv4's recogniser: every
    MatMul and its CTC head); layers read weights from initializers (compiler/layers.py), so
    those would be activation matmuls of 0 bytes and DMPQ would not see 9 MB of them. Scalars
    and shape vectors stay nodes (converters read some of them from Constant nodes).
    """
    g = model.graph
    outputs = {o.name for o in g.output}
    biases = {n.input[2] for n in g.node if n.op_type in _BIASED and len(n.input) > 2}
    keep, moved = [], []
    for n in g.node:
        t = n.attribute[0].t if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value" else None
        weight = t is not None and (len(t.dims) >= 2 or n.output[0] in biases)
        if weight and t.data_type == onnx.TensorProto.FLOAT and n.output[0] not in outputs:
            w = onnx.TensorProto()
            w.CopyFrom(t)
            w.name = n.output[0]
            moved.append(w)
        else:
            keep.append(n)
    if moved:
        del g.node[:]
        g.node.extend(keep)
        g.initializer.extend(moved)
    return model


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with opset >= 13, unique node names, weights held by Constant nodes as initializers,
    and BatchNormalization folded into convolutions."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out = upgrade_opset(out)
    return fold_batchnorm(weights_as_initializers(name_nodes(out)))


def prepared(graph: ModelGraph) -> ModelGraph:
    """The graph plans are made on and lowered from: opset >= 13, unique node names (idempotent).

    The source hash is kept, so a plan made on it still names the user's model.
    """
    return ModelGraph(normalize(graph.model), graph.inputs, graph.outputs, graph.source, graph.layer_map)
