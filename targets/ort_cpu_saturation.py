"""Per-layer int8 weight bits for x86 CPUs without VNNI, chosen by running each layer both ways.

On such CPUs onnxruntime's uint8 x int8 kernels add two products into a saturating int16
(``ort_cpu_isa.py``). Whether that clips depends on the layer's weights and on the activations it
really sees, so nothing short of running it tells: full-range (8-bit) codes clipped OriNet's
convolutions to top-1 0.958, while 7-bit codes (onnxruntime's ``reduce_range``) everywhere cost
YOLOv8n and PP-OCRv4 more than their saturation did. Here every int8 layer is cut out of the
model as a one-layer graph, lowered with 8-bit and with 7-bit weights, and run by onnxruntime with
default session options (its fused integer kernels, as the build will run) on the inputs the FP32
model gives it on calibration samples; the layer keeps 7 bits only where that error is the smaller.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from dscompile.compiler.capabilities import INT8, INT8_DYNAMIC, Layer
from dscompile.compiler.layers import ACT_MATMUL
from dscompile.compiler.runtime import ort_session
from dscompile.targets.ort_cpu_isa import REDUCED_BITS
from dscompile.targets.ort_cpu_qdq import Range, lower_qdq

log = logging.getLogger("dscompile")
Feed = dict[str, np.ndarray]
PROBE_SAMPLES = 8
CAPTURE_BYTES = 512 << 20  # the layer inputs kept for the probe, all samples together
PROBED = (INT8, INT8_DYNAMIC)  # the precisions that run on the uint8 x int8 kernels
OUT_SUFFIX = "__probe"


def layer_errors(
    model: onnx.ModelProto, layers: Sequence[Layer], precisions: dict[str, str], ranges: dict[str, Range],
    feeds: Sequence[Feed], threads: int | None = None,
) -> dict[str, dict[int, float]]:
    """layer -> {bits: normalised squared error of the layer's output against FP32} for 8 and 7 bits.

    Layers whose inputs are not all float activations of the model (none of DMPQ's own) are left out.
    """
    todo = [lay for lay in layers if precisions.get(lay.name) in PROBED and lay.weights
            and lay.op not in (ACT_MATMUL, "Gather")]
    model_outputs = {o.name for o in model.graph.output}
    cut = {lay.name: _one_layer(model, lay, model_outputs) for lay in todo}
    cut = {k: v for k, v in cut.items() if v is not None}
    if not cut:
        return {}
    inputs = _captured(model, sorted({i.name for m in cut.values() for i in m.graph.input}), feeds[:PROBE_SAMPLES], threads)
    errors = {}
    for lay in todo:
        if lay.name in cut:
            errors[lay.name] = _errors(cut[lay.name], lay, precisions[lay.name], ranges, inputs, threads)
    return errors


def reduced_layers(errors: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """The layers whose 7-bit build measured closer to FP32 than their 8-bit one."""
    return {name: e for name, e in errors.items() if e[REDUCED_BITS] < e[8]}


def _one_layer(model: onnx.ModelProto, lay: Layer, model_outputs: set[str]) -> onnx.ModelProto | None:
    """The layer's nodes as a graph of their own. An output the model passes on goes through an
    Identity, so a static layer quantises it as in the whole model (a graph output it would not)."""
    names = set(lay.nodes)
    nodes = [n for n in model.graph.node if n.name in names]
    inits = {t.name: t for t in model.graph.initializer}
    produced = {o for n in nodes for o in n.output}
    feeds = list(dict.fromkeys(i for n in nodes for i in n.input if i and i not in produced and i not in inits))
    if not feeds or set(feeds) - set(lay.inputs):
        return None
    used = list(dict.fromkeys(i for n in nodes for i in n.input if i in inits))
    passed = [o for o in lay.outputs if o not in model_outputs]
    outs = [helper.make_node("Identity", [o], [o + OUT_SUFFIX], name=o + OUT_SUFFIX) for o in passed]
    graph = helper.make_graph(
        [*nodes, *outs], lay.name,
        [helper.make_tensor_value_info(i, onnx.TensorProto.FLOAT, None) for i in feeds],
        [helper.make_tensor_value_info(o + OUT_SUFFIX if o in passed else o, onnx.TensorProto.FLOAT, None)
         for o in lay.outputs],
        [inits[i] for i in used],
    )
    m = helper.make_model(graph, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    return m


def _captured(model: onnx.ModelProto, names: list[str], feeds: Sequence[Feed], threads: int | None) -> list[Feed]:
    """The named float tensors of the FP32 model, one dict per feed, for as many feeds as
    ``CAPTURE_BYTES`` holds (at least one)."""
    from dscompile.compiler.distill_capture import prefix, with_outputs

    graph_inputs = {i.name for i in model.graph.input}
    inner = [n for n in names if n not in graph_inputs]
    sess = ort_session(with_outputs(prefix(model, inner), inner), threads, optimize=False) if inner else None
    wanted = {i.name for i in sess.get_inputs()} if sess else set()
    out: list[Feed] = []
    for feed in feeds:
        got = dict(zip(inner, sess.run(inner, {k: v for k, v in feed.items() if k in wanted}), strict=True)) if sess else {}
        out.append({n: (feed[n] if n in graph_inputs else got[n]) for n in names})
        if sum(v.nbytes for v in out[0].values()) * (len(out) + 1) > CAPTURE_BYTES:
            break  # every layer's input, per sample: a large model's activations are kept for fewer samples
    return out


def _errors(cut: onnx.ModelProto, lay: Layer, precision: str, ranges: dict[str, Range], inputs: list[Feed],
            threads: int | None) -> dict[int, float]:
    feeds = [{i.name: f[i.name] for i in cut.graph.input} for f in inputs]
    reference = ort_session(cut, threads)
    refs = [reference.run(None, f) for f in feeds]
    errors = {}
    for bits in (8, REDUCED_BITS):
        sess = ort_session(lower_qdq(cut, [lay], {lay.name: precision}, ranges, weight_bits=bits), threads)
        num = den = 0.0
        for f, ref in zip(feeds, refs, strict=True):
            for r, g in zip(ref, sess.run(None, f), strict=True):
                num += float(np.sum((np.asarray(g, np.float64) - r) ** 2))
                den += float(np.sum(np.asarray(r, np.float64) ** 2))
        errors[bits] = num / max(den, 1e-30)
    return errors
