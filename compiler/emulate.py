"""One switchable fake-quantisation model for every layer and precision.

Sensitivity needs the model's output with *one* layer lowered at a time, for
every layer and precision: building and loading a model per case is slow. We
build one onnxruntime session instead, in which

- every quantisable weight is a graph input (fed as fp32, or fake-quantised
  as the target's numerics say), and
- every layer input (and, for static schemes, output) passes through a gated
  fake-quantiser ``y = x + g * (fq(x) - x)``; the gate ``g`` is a scalar input,
  0 (exact identity) or 1.

The numerics of each precision come from the target (``Numerics``), so the
same emulator serves every target; it runs on this machine's CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from dscompile.compiler import qdq
from dscompile.compiler.capabilities import Layer, Numerics
from dscompile.compiler.layers import GraphIndex
from onnx import TensorProto, helper

GATE_MODES = ("static", "static16", "dynamic", "fp16")


@dataclass
class Emulator:
    """The switchable model plus what to feed for a given layer/precision case."""

    model: onnx.ModelProto
    weights: dict[str, np.ndarray]  # graph-input weights, fp32
    gates: dict[tuple[str, str], str] = field(default_factory=dict)  # (layer, mode) -> gate input
    nodes: dict[str, onnx.NodeProto] = field(default_factory=dict)

    def base_feed(self) -> dict[str, np.ndarray]:
        feed = dict(self.weights)
        feed.update({g: np.zeros((), np.float32) for g in self.gates.values()})
        return feed

    def case_feed(self, layer: Layer, numerics: Numerics) -> dict[str, np.ndarray]:
        """Entries that override ``base_feed`` to lower ``layer`` alone."""
        feed: dict[str, np.ndarray] = {}
        gate = self.gates.get((layer.name, numerics.activation))
        if gate:
            feed[gate] = np.ones((), np.float32)
        w = layer.weights[0] if layer.weights else None
        if w in self.weights and numerics.weight != "none":
            feed[w] = fake_weight(self.weights[w], self.nodes[layer.nodes[0]], numerics)
        return feed


def fake_weight(w: np.ndarray, node: onnx.NodeProto, numerics: Numerics) -> np.ndarray:
    """``w`` after the round trip through the precision's weight scheme."""
    if numerics.weight == "fp16":
        return w.astype(np.float16).astype(np.float32)
    if numerics.weight == "int8_channel":
        return qdq.symmetric_per_channel(w, qdq.channel_axis(node, w.ndim)).dequantize()
    if numerics.weight == "int4_block":
        kn = qdq.as_kn(node, w)
        if kn.ndim != 2:
            return w
        back = qdq.block_int4(kn, numerics.block_size or 32, numerics.weight_symmetric).dequantize()
        return np.ascontiguousarray(back.T) if back.shape != w.shape else back
    return w


def build_emulator(
    model: onnx.ModelProto, layers: list[Layer], modes: dict[str, set[str]],
    ranges: dict[str, tuple[float, float]], symmetric: bool, dynamic_batch: bool = True,
) -> Emulator:
    """``modes[layer]``: the activation modes its precisions use; ``ranges``: static [lo, hi] per tensor."""
    ed = qdq.GraphEditor(model)
    index = GraphIndex.of(ed.model)
    nodes = {n.name: n for n in ed.graph.node}
    weights = _weights_to_inputs(ed, layers, index, nodes)
    emu = Emulator(ed.model, weights, nodes=nodes)
    for lay in layers:
        for mode in sorted(modes.get(lay.name, set()) & set(GATE_MODES)):
            gate = ed.unique(f"gate__{lay.name}__{mode}")
            ed.graph.input.append(helper.make_tensor_value_info(gate, TensorProto.FLOAT, []))
            emu.gates[(lay.name, mode)] = gate
            entry = [n for n in (nodes[x] for x in lay.nodes) if any(i in lay.inputs for i in n.input)]
            for t in lay.inputs:
                if t in index.initializers:
                    continue
                _gated(ed, t, gate, mode, ranges, symmetric, [n for n in entry if t in n.input])
            if mode in ("static", "static16"):
                for out in lay.outputs[:1]:
                    if out not in index.graph_outputs:
                        _gated(ed, out, gate, mode, ranges, symmetric, None)
    finished = ed.finish()
    if dynamic_batch:
        _free_batch_axis(finished, set(weights))
    emu.model = finished
    return emu


def _weights_to_inputs(ed: qdq.GraphEditor, layers: list[Layer], index: GraphIndex, nodes: dict) -> dict[str, np.ndarray]:
    weights: dict[str, np.ndarray] = {}
    for lay in layers:
        w = lay.weights[0] if lay.weights else None
        if w is None or w in weights or w not in ed.inits or nodes[lay.nodes[0]].op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        arr = ed.weight(w)
        if arr.dtype != np.float32:
            continue
        weights[w] = arr
        ed.graph.input.append(helper.make_tensor_value_info(w, TensorProto.FLOAT, list(arr.shape)))
    keep = [t for t in ed.graph.initializer if t.name not in weights]
    del ed.graph.initializer[:]
    ed.graph.initializer.extend(keep)
    for w in weights:
        ed.inits.pop(w, None)
    return weights


def _gated(ed: qdq.GraphEditor, tensor: str, gate: str, mode: str, ranges: dict, symmetric: bool, users) -> None:
    """x -> x + g * (fq(x) - x), rewiring ``users`` (None: every consumer)."""
    if mode in ("static", "static16") and tensor not in ranges:
        return  # no calibrated range: nothing to emulate (the plan will say so)
    base = f"{tensor}__{gate}"
    targets = users if users is not None else [n for n in ed.graph.node if tensor in n.input]
    fq = ed.unique(f"{base}_fq")
    if mode == "static":
        lo, hi = ranges[tensor]
        dtype = "int8" if symmetric else "uint8"
        scale, zp = qdq.affine_params(lo, hi, dtype, symmetric)
        s = ed.add_initializer(f"{base}_s", np.array(scale, np.float32))
        z = ed.add_initializer(f"{base}_z", np.array(zp, dtype=dtype))
        q = ed.unique(f"{base}_q")
        ed.add_node("QuantizeLinear", [tensor, s, z], [q], f"{base}_Q")
        ed.add_node("DequantizeLinear", [q, s, z], [fq], f"{base}_DQ")
    elif mode == "static16":
        lo, hi = ranges[tensor]
        amax = max(abs(lo), abs(hi)) or 1.0
        s = ed.add_initializer(f"{base}_s", np.array(amax / 32767, np.float32))
        z = ed.add_initializer(f"{base}_z", np.array(0, np.int16))
        q = ed.unique(f"{base}_q")
        ed.add_node("QuantizeLinear", [tensor, s, z], [q], f"{base}_Q", domain=qdq.MS_DOMAIN)
        ed.add_node("DequantizeLinear", [q, s, z], [fq], f"{base}_DQ", domain=qdq.MS_DOMAIN)
    elif mode == "dynamic":
        q, s, z = ed.unique(f"{base}_q"), ed.unique(f"{base}_s"), ed.unique(f"{base}_z")
        ed.add_node("DynamicQuantizeLinear", [tensor], [q, s, z], f"{base}_DQL")
        ed.add_node("DequantizeLinear", [q, s, z], [fq], f"{base}_DQ")
    else:  # fp16
        half = ed.unique(f"{base}_half")
        ed.add_node("Cast", [tensor], [half], f"{base}_C16", to=TensorProto.FLOAT16)
        ed.add_node("Cast", [half], [fq], f"{base}_C32", to=TensorProto.FLOAT)
    diff, scaled, out = ed.unique(f"{base}_d"), ed.unique(f"{base}_gd"), ed.unique(f"{base}_y")
    ed.add_node("Sub", [fq, tensor], [diff], f"{base}_Sub")
    ed.add_node("Mul", [diff, gate], [scaled], f"{base}_Mul")
    ed.add_node("Add", [tensor, scaled], [out], f"{base}_Add")
    ed.rewire(tensor, out, targets)


def _free_batch_axis(model: onnx.ModelProto, weights: set[str]) -> None:
    """Name axis 0 of inputs and outputs ``batch`` so stacked samples run at once (when the graph allows)."""
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name in weights or vi.name.startswith("gate__"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    del model.graph.value_info[:]
