"""From a plan over ONNX layers to a precision per TFLite op, with the ranges each needs.

A TFLite op belongs to the plan layer whose ONNX node produced the tensor it
outputs (by the verified tensor map); a weight op whose output has no ONNX
twin (a matmul before a separate bias add) joins the layer of its consumer.
Ops in no layer (reshapes, transposes, pooling, softmax...) are "glue": they
are quantized with a statically quantized neighbour when every tensor they
touch has a calibrated range, so an int8 graph stays integer between layers
instead of bouncing through float. Tensors with no ONNX twin (the inside of a
decomposed LayerNorm: no ONNX tensor carries those values), and mapped ones
whose ONNX twin the table did not calibrate, take the range measured on the
float .tflite (targets/tflite_ranges.py) when the build has
calibration samples; an op with a tensor still without a range stays float, and
the report says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from dscompile.compiler.capabilities import FP32, INT8, INT16X8
from dscompile.targets.tflite_flatbuffer import TflGraph, TflOp
from dscompile.targets.tflite_tensor_map import TensorMap

Range = tuple[float, float]
STATIC = (INT8, INT16X8)
# Ops whose outputs hold values of their (first) input only: ranges carry across them both ways.
RANGE_PRESERVING = {
    "RESHAPE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS", "STRIDED_SLICE", "SLICE", "GATHER", "GATHER_ND",
    "MAX_POOL_2D", "SPLIT", "SPLIT_V", "PACK", "UNPACK", "CONCATENATION", "DEPTH_TO_SPACE",
    "SPACE_TO_DEPTH", "RESIZE_NEAREST_NEIGHBOR", "BROADCAST_TO", "TILE",
    # onnx2tf splits a Conv's padding into a PAD op (zeros; the quantized grid always holds 0)
    "PAD", "MIRROR_PAD",
}
# Ops whose output range is fixed by the op itself (TFLite's int8 kernels fix their output scale too).
FIXED_OUTPUT_RANGE = {"SOFTMAX": (0.0, 1.0), "LOGISTIC": (0.0, 1.0), "TANH": (-1.0, 1.0)}
_WEIGHTED_NODES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
WEIGHT_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "BATCH_MATMUL", "EMBEDDING_LOOKUP"}


@dataclass(frozen=True)
class OpAssignment:
    precision: dict[int, str]  # TFLite op index -> precision (every op; fp32 = left float)
    layer: dict[int, str]  # TFLite op index -> plan layer name ("" for glue)
    ranges: dict[str, Range]  # TFLite tensor -> [lo, hi] for every statically quantized op's tensors
    symmetric: dict[int, bool]  # op index -> symmetric activations
    kept_float: list[dict[str, object]] = field(default_factory=list)  # static wanted, no range
    measured: tuple[str, ...] = ()  # quantized tensors whose range was measured on the float .tflite
    floored: dict[str, tuple[Range, Range]] = field(default_factory=dict)  # tensor -> (range, cut range) at a SOFTMAX floor

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.precision.values():
            out[p] = out.get(p, 0) + 1
        return dict(sorted(out.items()))


def _float_acts(graph: TflGraph, op: TflOp) -> list[str]:
    t = graph.tensors
    ids = [i for i in op.inputs if i >= 0 and not t[i].constant] + [i for i in op.outputs if i >= 0]
    return [t[i].name for i in ids if t[i].dtype == "float32"]


def _has_weight(graph: TflGraph, op: TflOp) -> bool:
    return op.name in WEIGHT_OPS and any(
        i >= 0 and graph.tensors[i].constant and len(graph.tensors[i].shape) >= 2 for i in op.inputs
    )


def op_layers(graph: TflGraph, tmap: TensorMap, model: onnx.ModelProto, node_layer: Mapping[str, str]) -> dict[int, str]:
    """TFLite op -> plan layer, by the ONNX producers of the tensors it outputs.

    A weight op whose output is a bias Add's is a fused pair: onnx2tf folds a MatMul and the Add
    after it into one FULLY_CONNECTED, whose output is the Add's (paddle2onnx and Hugging Face
    exports write linear layers that way, the bias often in a Constant node). It belongs to the
    MatMul's layer (``_fused_weight_layers``). Mapped by its output alone, it took the Add's layer
    (or, the Add in no layer, its consumer's) and that layer's precision: a plan's int4 or int16x8
    MatMul stayed float32 (PP-OCRv4: 4 MatMuls, 346 kB over the plan's predicted bytes).
    """
    producer = {o: n.name for n in model.graph.node for o in n.output}
    out: dict[int, str] = {}
    for op in graph.ops:
        hits = [node_layer.get(producer.get(o, ""), "") for i in op.outputs if i >= 0
                for o in tmap.tflite_to_onnx.get(graph.tensors[i].name, ())]
        hits = [h for h in hits if h]
        out[op.index] = hits[0] if hits else ""
    _fused_weight_layers(graph, tmap, model, node_layer, out)
    consumers = graph.consumers()
    for op in graph.ops:  # weight ops with no ONNX twin join their single consumer's layer
        if out[op.index] or not _has_weight(graph, op) or len(op.outputs) != 1:
            continue
        users = consumers.get(op.outputs[0], [])
        if len(users) == 1 and out.get(users[0].index):
            out[op.index] = out[users[0].index]
    _by_input(graph, tmap, model, node_layer, out)
    return out


def _fused_weight_layers(graph: TflGraph, tmap: TensorMap, model: onnx.ModelProto, node_layer: Mapping[str, str],
                         out: dict[int, str]) -> None:
    """Weight ops whose output is an Add's that a weighted node (MatMul, Gemm, Conv) feeds take that node's
    layer, when exactly one such layer does and no other weight op holds it."""
    nodes = {n.name: n for n in model.graph.node}
    producer = {o: n.name for n in model.graph.node for o in n.output}
    consts = {t.name for t in model.graph.initializer}
    weighted = {node_layer[n.name] for n in model.graph.node
                if n.op_type in _WEIGHTED_NODES and len(n.input) > 1 and n.input[1] in consts and node_layer.get(n.name)}
    ops = [op for op in graph.ops if _has_weight(graph, op)]
    taken = {out[op.index] for op in ops if out[op.index] in weighted}
    for op in ops:
        if out[op.index] in weighted:
            continue
        found = set()
        for o in (o for t in op.outputs if t >= 0 for o in tmap.tflite_to_onnx.get(graph.tensors[t].name, ())):
            node = nodes.get(producer.get(o, ""))
            for x in node.input if node is not None and node.op_type == "Add" else ():
                up = nodes.get(producer.get(x, ""))
                if up is not None and up.op_type in _WEIGHTED_NODES and node_layer.get(up.name) in weighted:
                    found.add(node_layer[up.name])
        found -= taken
        if len(found) == 1:
            out[op.index] = found.pop()
            taken.add(out[op.index])


def _by_input(graph: TflGraph, tmap: TensorMap, model: onnx.ModelProto, node_layer: Mapping[str, str],
              out: dict[int, str]) -> None:
    """Weight ops still in no layer take the one weighted layer reading the same input that has no weight op yet.

    onnx2tf folds what follows a convolution into its weights (HardSigmoid's x/6 + 1/2 in a
    squeeze-excite block), so the op's output matches no ONNX tensor and its consumer
    (RELU_0_TO_1) is in no layer; its input still matches the ONNX convolution's.
    """
    taken = {out[op.index] for op in graph.ops if out[op.index] and _has_weight(graph, op)}
    readers: dict[str, list[str]] = {}
    for n in model.graph.node:
        if n.op_type in _WEIGHTED_NODES and n.input and node_layer.get(n.name):
            readers.setdefault(n.input[0], []).append(node_layer[n.name])
    for op in graph.ops:
        if out[op.index] or not _has_weight(graph, op):
            continue
        data = [i for i in op.inputs if i >= 0 and not graph.tensors[i].constant][:1]
        names = [o for i in data for o in tmap.tflite_to_onnx.get(graph.tensors[i].name, ())]
        found = {lay for o in names for lay in readers.get(o, ()) if lay not in taken}
        if len(found) == 1:
            out[op.index] = found.pop()
            taken.add(out[op.index])


NORMALIZATIONS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization")
_MAX_NORM_OPS = 24  # a decomposed normalization is ~10 TFLite ops; more means the map did not bound it


def normalization_ops(graph: TflGraph, tmap: TensorMap, model: onnx.ModelProto) -> set[int]:
    """TFLite ops onnx2tf decomposed an ONNX normalization node into (MEAN, SQUARED_DIFFERENCE, RSQRT...).

    Found backwards from the TFLite twin of the node's output to the twin of its input. Left as glue,
    they would follow an int8 neighbour: on all-MiniLM-L6-v2 each int8 stage of a LayerNorm adds 7-35 %
    relative error (the variance's range spans 0.002-0.03 on a per-tensor grid) and the embedding's
    pooled cosine fell to 0.21 with int8 Adds alone.
    """
    t, producer = graph.tensors, graph.producer()
    index = {x.name: x.index for x in t}
    found: set[int] = set()
    for node in model.graph.node:
        if node.op_type not in NORMALIZATIONS:
            continue
        start = index.get(tmap.onnx_to_tflite.get(node.output[0], ""))
        stop = index.get(tmap.onnx_to_tflite.get(node.input[0], ""))
        if start is None or stop is None:
            continue
        ops: set[int] = set()
        todo = [start]
        while todo and len(ops) <= _MAX_NORM_OPS:
            op = producer.get(todo.pop())
            if op is None or op.index in ops:
                continue
            ops.add(op.index)
            todo.extend(i for i in op.inputs if i >= 0 and i != stop and not t[i].constant)
        if len(ops) <= _MAX_NORM_OPS and not todo:
            found |= ops
    return found


def propagate_ranges(graph: TflGraph, known: dict[str, Range]) -> dict[str, Range]:
    """Carry ranges across range-preserving ops (both directions) until nothing changes."""
    ranges = dict(known)
    t = graph.tensors
    for op in graph.ops:
        if op.name in FIXED_OUTPUT_RANGE:
            for i in op.outputs:
                ranges.setdefault(t[i].name, FIXED_OUTPUT_RANGE[op.name])
    for _ in range(len(graph.ops) + 1):
        changed = False
        for op in graph.ops:
            if op.name not in RANGE_PRESERVING:
                continue
            data = [t[i].name for i in op.inputs if i >= 0 and not t[i].constant and t[i].dtype == "float32"]
            data = data if op.name == "CONCATENATION" or op.name == "PACK" else data[:1]
            outs = [t[i].name for i in op.outputs if i >= 0 and t[i].dtype == "float32"]
            if data and all(d in ranges for d in data):
                merged = (min(ranges[d][0] for d in data), max(ranges[d][1] for d in data))
                for o in outs:
                    if o not in ranges:
                        ranges[o], changed = merged, True
            src = next((ranges[o] for o in outs if o in ranges), None)
            if src is not None and len(data) == 1 and data[0] not in ranges:
                ranges[data[0]], changed = src, True
        if not changed:
            break
    return ranges


def apply_floors(graph: TflGraph, ranges: dict[str, Range], floors: Mapping[str, float]) -> dict[str, Range]:
    """Raise the low end of each floored tensor's range to its floor, and of the tensors it copies
    (range-preserving producers upstream: the same values).

    A floored tensor made by an ADD (scores + mask) gets its addends cut too: TFLite's int8 ADD
    rescales each input to the output's scale, and an input ~160x coarser than the output (the
    mask's [-10000, 0] against the cut sum's [-11, 43]) wraps around instead of saturating (measured
    on all-MiniLM-L6-v2: masked logits came out as the largest, the softmax put all weight on
    padding). An addend only the floored ADDs read starts at ``floor - the other addends' highs``:
    every masked sum still lands at or below the floor, where it saturates.
    """
    if not floors:
        return ranges
    out = dict(ranges)
    t, producer, consumers = graph.tensors, graph.producer(), graph.consumers()
    index = {x.name: x.index for x in t}

    def cut(i: int | None, floor: float) -> None:
        while i is not None and t[i].name in out:
            lo, hi = out[t[i].name]
            if floor <= lo or floor >= hi:
                return
            out[t[i].name] = (floor, hi)
            op = producer.get(i)
            data = [j for j in op.inputs if j >= 0 and not t[j].constant and t[j].dtype == "float32"] if op else []
            single = op is not None and op.name in RANGE_PRESERVING and op.name not in ("CONCATENATION", "PACK")
            i = data[0] if single and data else None
            if i is not None and len(consumers.get(i, [])) != 1:
                return  # another op reads the values before this one: they keep their range

    for name, floor in floors.items():
        cut(index.get(name), floor)
    floored_adds: dict[int, float] = {}  # ADD op -> the floor of its output
    for name, floor in floors.items():
        i = index.get(name)
        while i is not None and i in producer:
            op = producer[i]
            if op.name == "ADD":
                floored_adds[op.index] = floor
                break
            if op.name not in RANGE_PRESERVING:
                break
            data = [j for j in op.inputs if j >= 0 and not t[j].constant]
            i = data[0] if len(data) == 1 else None
    wanted: dict[int, float] = {}
    for op in graph.ops:
        if op.index not in floored_adds:
            continue
        ins = [j for j in op.inputs if j >= 0]
        if any(t[j].constant or t[j].name not in out for j in ins):
            continue
        for j in ins:
            others = sum(out[t[k].name][1] for k in ins if k != j)
            wanted[j] = min(wanted.get(j, np.inf), floored_adds[op.index] - others)
    for j, lo in wanted.items():
        if all(c.index in floored_adds for c in consumers.get(j, [])):
            cut(j, lo)
    return out


def assign_ops(
    graph: TflGraph, tmap: TensorMap, model: onnx.ModelProto, node_layer: Mapping[str, str],
    layer_precision: Mapping[str, str], onnx_range: Callable[[str], Range | None],
    symmetric_layers: Mapping[str, bool] = {}, measured: Mapping[str, Range] = {},
    floors: Mapping[str, float] = {},
) -> OpAssignment:
    """The precision of every TFLite op under a plan, and the ranges of its tensors.

    ``measured``: ranges of TFLite tensors taken on the float .tflite; they fill only
    tensors that neither the map (with the table) nor propagation from them gives a range.
    ``floors``: lowest value worth representing per SOFTMAX input (targets/tflite_ranges.py
    ``softmax_floors``); a range reaching below it (an additive attention mask) is cut there.
    """
    layer_of = op_layers(graph, tmap, model, node_layer)
    known = {}
    for tname, onames in tmap.tflite_to_onnx.items():
        found = next((r for r in map(onnx_range, onames) if r is not None), None)
        if found is not None:
            known[tname] = found
    ranges = base = propagate_ranges(graph, known)
    filled = {n: r for n, r in measured.items() if n not in base}
    if filled:  # propagate again: a measured range also holds across the reshapes around its tensor
        ranges = propagate_ranges(graph, {**base, **filled})
    derived = set(ranges) - set(base)
    uncut, ranges = ranges, apply_floors(graph, ranges, floors)
    precision: dict[int, str] = {}
    kept: list[dict[str, object]] = []
    for op in graph.ops:
        lay = layer_of[op.index]
        p = layer_precision.get(lay, FP32) if lay else FP32
        if p in STATIC:
            missing = [n for n in _float_acts(graph, op) if n not in ranges]
            if missing:
                kept.append({"op": op.name, "index": op.index, "layer": lay, "wanted": p, "no_range_for": missing[0]})
                p = FP32
        elif p != FP32 and not _has_weight(graph, op):
            p = FP32  # weight precisions change weights; this op of the layer has none
        precision[op.index] = p
    norm = normalization_ops(graph, tmap, model)
    _glue(graph, layer_of, precision, ranges, skip=norm)
    kept.extend(_no_int16_broadcast_add(graph, layer_of, precision))
    kept.extend(_float_glue(graph, layer_of, precision, ranges))
    used = {n for op in graph.ops if precision[op.index] in STATIC for n in _float_acts(graph, op)}
    symmetric = {i: precision[i] == INT16X8 or symmetric_layers.get(layer_of[i], False) for i in precision}
    cut = {n: (uncut[n], ranges[n]) for n in sorted(used) if ranges[n] != uncut[n]}
    return OpAssignment(precision, layer_of, {n: ranges[n] for n in used}, symmetric, kept,
                        tuple(sorted(used & derived)), cut)


def _no_int16_broadcast_add(graph: TflGraph, layer_of: dict[int, str], precision: dict[int, str]) -> list[dict[str, object]]:
    """int16x8 ADDs whose operands broadcast stay float: LiteRT 2.3's int16 ADD kernel aborts the
    process on them (all-MiniLM-L6-v2: the attention mask [1,1,1,64] added to [1,12,64,64] scores,
    the LayerNorm epsilon; SIGABRT in EvalAddQuantized, seen with gdb), so no plan may build one."""
    t, out = graph.tensors, []
    for op in graph.ops:
        shapes = {t[i].shape for i in op.inputs if i >= 0}
        if op.name == "ADD" and precision[op.index] == INT16X8 and len(shapes) > 1:
            precision[op.index] = FP32
            out.append({"op": op.name, "index": op.index, "layer": layer_of[op.index], "wanted": INT16X8,
                        "why": "LiteRT's int16 ADD aborts on broadcasting operands"})
    return out


def _float_glue(graph: TflGraph, layer_of: dict[int, str], precision: dict[int, str],
                ranges: dict[str, Range]) -> list[dict[str, object]]:
    """Glue ops left float next to a quantized op because a tensor of theirs has no range."""
    producer, consumers = graph.producer(), graph.consumers()
    out = []
    for op in graph.ops:
        if layer_of[op.index] or precision[op.index] != FP32:
            continue
        near = [producer[i] for i in op.inputs if i in producer] + [c for i in op.outputs for c in consumers.get(i, [])]
        wanted = next((precision[n.index] for n in near if precision[n.index] in STATIC), None)
        missing = [a for a in _float_acts(graph, op) if a not in ranges]
        if wanted and missing:
            out.append({"op": op.name, "index": op.index, "layer": "", "wanted": wanted, "no_range_for": missing[0]})
    return out


def _glue(graph: TflGraph, layer_of: dict[int, str], precision: dict[int, str], ranges: dict[str, Range],
          skip: set[int] = frozenset()) -> None:
    """Quantize glue ops next to static ops (fixpoint), when all their tensors have ranges.

    Ops in ``skip`` (the inside of a decomposed normalization) follow an int16x8 neighbour only:
    their int8 kernels lose too much (``normalization_ops``)."""
    producer, consumers = graph.producer(), graph.consumers()

    def neighbours(op: TflOp) -> list[TflOp]:
        ups = [producer[i] for i in op.inputs if i in producer]
        downs = [c for i in op.outputs for c in consumers.get(i, [])]
        return ups + downs

    for _ in range(len(graph.ops)):
        changed = False
        for op in graph.ops:
            if layer_of[op.index] or precision[op.index] != FP32 or op.name in ("QUANTIZE", "DEQUANTIZE"):
                continue
            acts = _float_acts(graph, op)
            if not acts or any(a not in ranges for a in acts):
                continue
            near = [precision[n.index] for n in neighbours(op) if precision[n.index] in STATIC]
            if op.index in skip:
                near = [p for p in near if p == INT16X8]
            if near:
                precision[op.index] = INT16X8 if INT16X8 in near and INT8 not in near else near[0]
                changed = True
        if not changed:
            break
