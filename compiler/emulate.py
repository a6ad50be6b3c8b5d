"""One switchable fake-quantisation model for every layer and precision.

Sensitivity needs the model's output with *one* layer lowered at a time, for
every layer and precision: building and loading a model per case is slow. We
build one onnxruntime session instead, in which

- every quantisable weight stays a constant (so onnxruntime still pre-packs
  it), and its quantisation error is added behind a gate: the anchor op, being
  linear in its weight, gives ``op(x, W_q) = op(x, W) + op(x, W_q - W)``, so
  ``y = If(g_w, y + op(x, dW), y)`` with the constant ``dW`` per weight scheme;
- every layer input (and, for static schemes, output) passes through a gated
  fake-quantiser ``y = If(g, fq(x), x)``; the gate ``g`` is a boolean input, and
  an If runs only the branch taken, so closed gates cost next to nothing.

The numerics of each precision come from the target (``Numerics``), so the
same emulator serves every target; it runs on this machine's CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from dscompile.compiler import gptq, qdq
from dscompile.compiler.capabilities import Layer, Numerics
from dscompile.compiler.layers import GraphIndex

GATE_MODES = ("static", "static16", "dynamic", "fp16")


def weight_key(n: Numerics, op: str = "") -> str:
    key = f"w:{n.weight}:{n.block_size}:{int(n.weight_symmetric)}" + ("" if n.rounding == "nearest" else f":{n.rounding}")
    if op == "Gather" and n.gather_table == "tensor":  # the table's width follows the activations
        key += f":table:{n.activation}"
    return key


@dataclass
class Emulator:
    """The switchable model plus what to feed for a given layer/precision case."""

    model: onnx.ModelProto
    gates: dict[tuple[str, str], str] = field(default_factory=dict)  # (layer, mode or weight key) -> gate input

    def base_feed(self) -> dict[str, np.ndarray]:
        return {g: np.array(False) for g in self.gates.values()}

    def case_feed(self, layer: Layer, numerics: Numerics) -> dict[str, np.ndarray]:
        """Entries that override ``base_feed`` to lower ``layer`` alone."""
        feed: dict[str, np.ndarray] = {}
        for key in (numerics.activation, weight_key(numerics, layer.op)):
            gate = self.gates.get((layer.name, key))
            if gate:
                feed[gate] = np.array(True)
        return feed


def fake_weight(w: np.ndarray, node: onnx.NodeProto, numerics: Numerics, hessian: np.ndarray | None = None) -> np.ndarray:
    """``w`` after the round trip through the precision's weight scheme (``hessian``: the layer's input
    X^T X, for int4 MatMul weights GPTQ-rounded as the build rounds them)."""
    if numerics.weight == "fp16":
        return w.astype(np.float16).astype(np.float32)
    if node.op_type == "Gather" and numerics.gather_table == "tensor" and numerics.activation in ("static", "static16"):
        if numerics.activation == "static16":  # TFLite GATHER: the table at the activation width
            amax = float(np.abs(w).max()) or 1.0  # int16: symmetric
            return (np.clip(np.rint(w / (amax / 32767)), -32767, 32767) * (amax / 32767)).astype(np.float32)
        scale, zp = qdq.affine_params(float(w.min()), float(w.max()), "int8")
        return qdq.fake_quantize(w, scale, zp, "int8")
    if node.op_type == "Gather" and numerics.weight in ("int8_channel", "int4_block") and w.ndim == 2:
        bits = 4 if numerics.weight == "int4_block" else 8
        return qdq.gather_block_dequantized(w, bits, numerics.block_size or 32)
    if numerics.weight == "int8_channel":
        return qdq.symmetric_per_channel(w, qdq.channel_axis(node, w.ndim), numerics.weight_bits).dequantize()
    if numerics.weight == "int4_block":
        kn = qdq.as_kn(node, w)
        if kn.ndim != 2:
            return w
        if hessian is not None and numerics.rounding == "gptq" and not numerics.weight_symmetric:
            back = gptq.rounded(kn, hessian, numerics.block_size or 32).dequantize()
        else:
            back = qdq.block_int4(kn, numerics.block_size or 32, numerics.weight_symmetric).dequantize()
        # as_kn transposed a Gemm's transB weight: transpose back (a shape test misses square weights)
        transposed = node.op_type == "Gemm" and qdq._attr(node, "transB", 0)
        return np.ascontiguousarray(back.T) if transposed else back
    return w


def build_emulator(
    model: onnx.ModelProto, layers: list[Layer], cases: dict[str, list[Numerics]],
    ranges: dict[str, tuple[float, float]], symmetric: bool, dynamic_batch: bool = True,
    hessians: dict[str, np.ndarray] | None = None,
) -> Emulator:
    """``cases[layer]``: the numerics of the precisions to measure; ``ranges``: static [lo, hi] per tensor;
    ``hessians``: input tensor -> X^T X for the weights a precision rounds with GPTQ."""
    ed = qdq.GraphEditor(model)
    index = GraphIndex.of(ed.model)
    nodes = {n.name: n for n in ed.graph.node}
    emu = Emulator(ed.model)
    # Gates chain: a layer's input may already be rewired (its fp16 gate, the static output gate of
    # the layer before it), so each gate wraps what the layer reads *now* in place of the original.
    original = {n.name: list(n.input) for n in ed.graph.node}
    for lay in layers:
        numerics = cases.get(lay.name, [])
        for mode in sorted({n.activation for n in numerics} & set(GATE_MODES)):
            gate = _gate_input(ed, emu, lay, mode)
            for t in lay.inputs:
                if t in index.initializers:
                    continue
                for now, users in _readers(original, [nodes[x] for x in lay.nodes], t).items():
                    _gated(ed, now, gate, mode, ranges, symmetric, users, source=t)
            # int16x8 requantises every tensor; an int8 layer's output only where the runtime does
            # (onnxruntime's QLinear kernels do; TensorRT's layer writes float unless a Q follows).
            if mode == "static16" or (mode == "static" and any(n.quantize_output for n in numerics if n.activation == mode)):
                for out in lay.outputs[:1]:
                    if out not in index.graph_outputs:
                        _gated(ed, out, gate, mode, ranges, symmetric, None)
        anchor = nodes[lay.nodes[0]]
        w = lay.weights[0] if lay.weights else None
        if w is None or w not in ed.inits or anchor.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"):
            continue
        for n in {weight_key(n, anchor.op_type): n for n in numerics if n.weight != "none"}.values():
            _weight_error(ed, emu, lay, anchor, n, (hessians or {}).get(anchor.input[0]))
    finished = ed.finish()
    if dynamic_batch:
        _free_batch_axis(finished)
    emu.model = finished
    return emu


def _gate_input(ed: qdq.GraphEditor, emu: Emulator, lay: Layer, key: str) -> str:
    gate = ed.unique(f"gate__{lay.name}__{key.replace(':', '_')}")
    ed.graph.input.append(helper.make_tensor_value_info(gate, TensorProto.BOOL, []))
    emu.gates[(lay.name, key)] = gate
    return gate


def _weight_error(ed: qdq.GraphEditor, emu: Emulator, lay: Layer, anchor: onnx.NodeProto, n: Numerics,
                  hessian: np.ndarray | None = None) -> None:
    """y -> If(g, y + op(x, W_q - W), y) behind the anchor (before any fused activation)."""
    w = ed.weight(anchor.input[1] if anchor.op_type != "Gather" else anchor.input[0])
    if w.dtype != np.float32:
        return
    dw = (fake_weight(w, anchor, n, hessian if anchor.op_type in ("MatMul", "Gemm") else None) - w).astype(np.float32)
    gate = _gate_input(ed, emu, lay, weight_key(n, anchor.op_type))
    d_name = ed.add_initializer(f"{lay.name}__{gate}_dW", dw)
    # the anchor now writes y_pre; the If writes the tensor everyone (graph outputs included) reads
    out = anchor.output[0]
    y = ed.unique(f"{out}__{gate}_pre")
    anchor.output[0] = y
    delta, summed, keep = (ed.unique(f"{y}_{k}") for k in ("delta", "sum", "keep"))
    inputs = [d_name, anchor.input[1]] if anchor.op_type == "Gather" else [anchor.input[0], d_name]
    clone = helper.make_node(anchor.op_type, inputs, [delta], name=ed.unique(f"{anchor.name}__{gate}_err"))
    clone.attribute.extend(a for a in anchor.attribute if a.name != "beta")
    add = helper.make_node("Add", [y, delta], [summed], name=ed.unique(f"{anchor.name}__{gate}_add"))
    then_g = helper.make_graph([clone, add], f"{gate}_on", [], [helper.make_tensor_value_info(summed, TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Identity", [y], [keep], name=ed.unique(f"{gate}_id"))], f"{gate}_off", [],
                               [helper.make_tensor_value_info(keep, TensorProto.FLOAT, None)])
    ed.add_node("If", [gate], [out], f"{gate}_If", then_branch=then_g, else_branch=else_g)


def _readers(original: dict[str, list[str]], nodes: list[onnx.NodeProto], tensor: str) -> dict[str, list[onnx.NodeProto]]:
    """What each of ``nodes`` now reads where it read ``tensor`` in the model as given -> those nodes."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for name in {n.input[i] for i, was in enumerate(original.get(n.name, ())) if was == tensor}:
            out.setdefault(name, []).append(n)
    return out


def _gated(ed: qdq.GraphEditor, tensor: str, gate: str, mode: str, ranges: dict, symmetric: bool, users,
           source: str | None = None) -> None:
    """x -> If(gate, fq(x), x), rewiring ``users`` (None: every consumer).

    ``source``: the model's tensor whose calibrated range applies when ``tensor`` is a gated copy of it.
    An If runs only the branch taken, so an open gate costs nothing but the If itself.
    """
    source = source or tensor
    if mode in ("static", "static16") and source not in ranges:
        return  # no calibrated range: nothing to emulate (the plan will say so)
    base = f"{source}__{gate}"
    targets = users if users is not None else [n for n in ed.graph.node if tensor in n.input]
    fq = ed.unique(f"{base}_fq")
    nodes = []
    if mode in ("static", "static16"):
        lo, hi = ranges[source]
        if mode == "static":
            dtype = "int8" if symmetric else "uint8"
            scale, zp = qdq.affine_params(lo, hi, dtype, symmetric)
            s = ed.add_initializer(f"{base}_s", np.array(scale, np.float32))
            z = ed.add_initializer(f"{base}_z", np.array(zp, dtype=dtype))
            domain = None
        else:
            amax = max(abs(lo), abs(hi)) or 1.0
            s = ed.add_initializer(f"{base}_s", np.array(amax / 32767, np.float32))
            z = ed.add_initializer(f"{base}_z", np.array(0, np.int16))
            domain = qdq.MS_DOMAIN
            ed.domains.add(qdq.MS_DOMAIN)
        q = ed.unique(f"{base}_q")
        nodes += [helper.make_node("QuantizeLinear", [tensor, s, z], [q], name=ed.unique(f"{base}_Q"), domain=domain),
                  helper.make_node("DequantizeLinear", [q, s, z], [fq], name=ed.unique(f"{base}_DQ"), domain=domain)]
    elif mode == "dynamic":
        q, s, z = ed.unique(f"{base}_q"), ed.unique(f"{base}_s"), ed.unique(f"{base}_z")
        nodes += [helper.make_node("DynamicQuantizeLinear", [tensor], [q, s, z], name=ed.unique(f"{base}_DQL")),
                  helper.make_node("DequantizeLinear", [q, s, z], [fq], name=ed.unique(f"{base}_DQ"))]
    else:  # fp16
        half = ed.unique(f"{base}_half")
        nodes += [helper.make_node("Cast", [tensor], [half], name=ed.unique(f"{base}_C16"), to=TensorProto.FLOAT16),
                  helper.make_node("Cast", [half], [fq], name=ed.unique(f"{base}_C32"), to=TensorProto.FLOAT)]
    keep = ed.unique(f"{base}_keep")
    then_g = helper.make_graph(nodes, f"{base}_on", [], [helper.make_tensor_value_info(fq, TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Identity", [tensor], [keep], name=ed.unique(f"{base}_Id"))],
                               f"{base}_off", [], [helper.make_tensor_value_info(keep, TensorProto.FLOAT, None)])
    out = ed.unique(f"{base}_y")
    ed.add_node("If", [gate], [out], f"{base}_If", then_branch=then_g, else_branch=else_g)
    ed.rewire(tensor, out, targets)


def _free_batch_axis(model: onnx.ModelProto) -> None:
    """Name axis 0 of inputs and outputs ``batch`` so stacked samples run at once (when the graph allows)."""
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name.startswith("gate__"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    del model.graph.value_info[:]
