"""ONNX-side preparation before onnx2tf: what to fix, what to refuse, how to lay inputs out.

- Exact GELU (``x * 0.5 * (1 + erf(x / sqrt 2))``) converts to a select-TF
  ``FlexErf`` op that neither LiteRT's builtin interpreter nor the Hexagon NPU
  runs. onnx2tf fuses the pattern into the builtin GELU op, but only in one
  operand order; torch exports another. ``canonical_gelu`` rewrites the
  pattern into the order onnx2tf recognises (same arithmetic, same result).
- Any other ``Erf`` is converted with onnx2tf's builtin-only approximation
  (error below 1.5e-7).
- ``Sub(constant, x)`` converts with its operands swapped in onnx2tf 1.29.24
  (seen on YOLOv8's box decoding: anchors - offsets came out as offsets -
  anchors); ``constant_first_sub`` writes it as ``x * -1 + constant``, the
  same numbers, in ops onnx2tf converts correctly.
- A 0-d constant operand of an element-wise op whose output repeats a
  dimension becomes shape [1] (``scalar_operands_as_vectors``).
- An ONNX op that onnx2tf has no converter for is refused up front, naming the
  node, instead of failing deep inside TensorFlow.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dscompile.compiler.graph import TensorSpec
from dscompile.compiler.samples import concrete_shape
from dscompile.errors import InputError

_SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class InputPlan:
    """How onnx2tf should treat the model's inputs."""

    channels_last: tuple[str, ...]  # 4-D/5-D float inputs onnx2tf moves to NHWC / NDHWC
    keep_shape: tuple[str, ...]  # every other input keeps its ONNX layout exactly
    overwrite_shapes: tuple[str, ...]  # "name:d0,d1,..." for inputs with dynamic dims


TFLITE_INPUT_DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool")


def plan_inputs(specs: tuple[TensorSpec, ...], model_inputs: tuple[TensorSpec, ...] = ()) -> InputPlan:
    """Image-like float inputs go channels-last (what the NPU wants); the rest keep their shape.

    3-D inputs (NCW sequences) would otherwise become NWC, and integer inputs
    (token ids) must never be permuted. TFLite and the NPU run static shapes:
    a dynamic batch becomes 1, any other dynamic axis must be given with
    ``--input-shape``; an input type TFLite cannot take is refused.
    """
    declared = {s.name: s for s in model_inputs}
    last, keep, overwrite = [], [], []
    for s in specs:
        if s.dtype not in TFLITE_INPUT_DTYPES:
            raise InputError(
                f"input {s.name!r} is {s.dtype}: a TFLite model takes {', '.join(TFLITE_INPUT_DTYPES)}; "
                "export the model with float32 inputs"
            )
        free = [i for i, d in enumerate(s.shape) if not isinstance(d, int) and i > 0]
        if free:
            raise InputError(
                f"input {s.name!r} has dynamic axis {free[0]} ({s.shape[free[0]]!r}): the snapdragon target builds "
                f"static shapes; give them with --input-shape {s.name}:{'x'.join(str(d) if isinstance(d, int) else 'N' for d in s.shape)}"
            )
        if s.dtype.startswith("float") and len(s.shape) in (4, 5):
            last.append(s.name)
        else:
            keep.append(s.name)
        if not s.is_static or not declared.get(s.name, s).is_static:
            overwrite.append(f"{s.name}:{','.join(str(d) for d in concrete_shape(s))}")
    return InputPlan(tuple(last), tuple(keep), tuple(overwrite))


def with_static_inputs(model: onnx.ModelProto, specs: tuple[TensorSpec, ...]) -> onnx.ModelProto:
    """The model with its inputs at the concrete shapes of ``specs`` and the shape arithmetic folded.

    A model exported with dynamic axes computes shapes at run time (Shape ->
    Range -> anchors, in detectors); TFLite and the NPU run static shapes, and
    onnx2tf converts such arithmetic only once it is constant. onnx-simplifier,
    told the input shapes, folds it; a model it cannot handle is kept as it was.
    """
    import onnxsim

    from dscompile.profiles.litert_runner import quiet_c_output

    shapes = {s.name: list(concrete_shape(s)) for s in specs}
    try:
        with quiet_c_output():  # onnxsim reports ops it cannot fold from C++, on stdout
            folded, ok = onnxsim.simplify(model, overwrite_input_shapes=shapes)
    except Exception:  # the simplifier is an optimisation; verification catches what it misses
        return model
    return folded if ok else model


def onnx2tf_ops() -> set[str]:
    """Op types onnx2tf has a converter module for (read from its package, without importing it:
    importing onnx2tf imports TensorFlow)."""
    spec = importlib.util.find_spec("onnx2tf")
    if spec is None or not spec.origin:
        return set()
    return {p.stem for p in (Path(spec.origin).parent / "ops").glob("*.py") if not p.stem.startswith("_")}


def check_convertible(model: onnx.ModelProto) -> None:
    """Refuse a node whose op has no onnx2tf converter, naming the first one."""
    known = onnx2tf_ops()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise InputError(
                f"ONNX node {node.name or node.output[0]!r} ({node.domain}::{node.op_type}) has no TFLite "
                "equivalent: custom-domain ops cannot be converted for the snapdragon target"
            )
        if node.op_type not in known:
            raise InputError(
                f"ONNX node {node.name or node.output[0]!r} ({node.op_type}) has no TFLite equivalent "
                f"(onnx2tf has no converter for {node.op_type})"
            )


def has_op(model: onnx.ModelProto, op_type: str) -> bool:
    return any(n.op_type == op_type for n in model.graph.node)


class _Graph:
    """Producer/consumer lookups and constant values over one ONNX graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}

    def scalar(self, name: str) -> float | None:
        v = self.consts.get(name)
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None

    def only_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None

    def other_input(self, node: onnx.NodeProto, known: str) -> str | None:
        if len(node.input) != 2 or known not in node.input:
            return None
        return node.input[1] if node.input[0] == known else node.input[0]


def _gelu_match(g: _Graph, erf: onnx.NodeProto) -> tuple[str, list[onnx.NodeProto]] | None:
    """(x, [scale, erf, add, mul_a, mul_b]) when ``erf`` sits in an exact-GELU pattern."""
    scale = g.producer.get(erf.input[0])
    if scale is None or scale.op_type not in ("Div", "Mul") or g.only_consumer(scale.output[0]) is not erf:
        return None
    c = g.scalar(scale.input[1])
    want = _SQRT2 if scale.op_type == "Div" else 1.0 / _SQRT2
    if c is None or not math.isclose(c, want, rel_tol=1e-6):
        return None
    x = scale.input[0]
    add = g.only_consumer(erf.output[0])
    if add is None or add.op_type != "Add" or g.scalar(g.other_input(add, erf.output[0]) or "") != 1.0:
        return None
    mul_a = g.only_consumer(add.output[0])
    if mul_a is None or mul_a.op_type != "Mul":
        return None
    mul_b = g.only_consumer(mul_a.output[0])
    if mul_b is None or mul_b.op_type != "Mul":
        return None
    factors = {g.other_input(mul_a, add.output[0]), g.other_input(mul_b, mul_a.output[0])}
    halves = [f for f in factors if f is not None and g.scalar(f) == 0.5]
    if len(halves) != 1 or factors != {x, halves[0]}:
        return None
    return x, [scale, erf, add, mul_a, mul_b]


def canonical_gelu(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite every exact-GELU pattern as ``((erf(x / 1.4142135) + 1) * x) * 0.5``.

    That is the one order onnx2tf fuses into TFLite's builtin GELU; the result
    is the same function. Returns the new model and the number rewritten.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _Graph(out)
    replaced: dict[str, list[onnx.NodeProto]] = {}  # keyed by a node's first output (stable)
    drop: set[str] = set()
    count = 0
    for erf in [n for n in out.graph.node if n.op_type == "Erf"]:
        found = _gelu_match(g, erf)
        if found is None:
            continue
        x, (scale, erf_node, add, mul_a, mul_b) = found
        tag = f"dscompile_gelu{count}"
        out.graph.initializer.extend([
            numpy_helper.from_array(np.array(1.0, np.float32), f"{tag}_one"),
            numpy_helper.from_array(np.array(0.5, np.float32), f"{tag}_half"),
        ])
        # onnx2tf reads the divisor's value from a Constant node's output, not from an initializer.
        sqrt2 = numpy_helper.from_array(np.array(np.float32(_SQRT2)), f"{tag}_sqrt2")
        new = [
            helper.make_node("Constant", [], [f"{tag}_sqrt2"], name=f"{tag}_sqrt2", value=sqrt2),
            helper.make_node("Div", [x, f"{tag}_sqrt2"], [scale.output[0]], name=scale.name),
            helper.make_node("Erf", [scale.output[0]], [erf_node.output[0]], name=erf_node.name),
            helper.make_node("Add", [erf_node.output[0], f"{tag}_one"], [add.output[0]], name=add.name),
            helper.make_node("Mul", [x, add.output[0]], [mul_a.output[0]], name=mul_a.name),
            helper.make_node("Mul", [mul_a.output[0], f"{tag}_half"], [mul_b.output[0]], name=mul_b.name),
        ]
        # The new nodes go where the last old one was: every input is ready by then.
        drop.update(n.output[0] for n in (scale, erf_node, add, mul_a))
        replaced[mul_b.output[0]] = new
        count += 1
    if not count:
        return out, 0
    nodes: list[onnx.NodeProto] = []
    for n in out.graph.node:
        key = n.output[0] if n.output else ""
        if key in drop:
            continue
        nodes.extend(replaced.get(key, [n]))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, count


def constant_first_sub(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite ``Sub(c, x)`` (c constant, x computed) as ``Add(Mul(x, -1), c)``; returns (model, count)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _Graph(out)
    nodes: list[onnx.NodeProto] = []
    count = 0
    for n in out.graph.node:
        if n.op_type != "Sub" or len(n.input) != 2 or n.input[0] not in g.consts or n.input[1] in g.consts:
            nodes.append(n)
            continue
        c = g.consts[n.input[0]]
        if not np.issubdtype(c.dtype, np.floating):
            nodes.append(n)
            continue
        tag = f"dscompile_sub{count}"
        out.graph.initializer.append(numpy_helper.from_array(np.array(-1, dtype=c.dtype), f"{tag}_minus_one"))
        nodes.append(helper.make_node("Mul", [n.input[1], f"{tag}_minus_one"], [f"{tag}_neg"], name=f"{n.name or tag}_neg"))
        nodes.append(helper.make_node("Add", [f"{tag}_neg", n.input[0]], list(n.output), name=n.name))
        count += 1
    if count:
        del out.graph.node[:]
        out.graph.node.extend(nodes)
    return out, count


_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Mod")


def scalar_operands_as_vectors(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Give 0-d constant operands of element-wise ops the shape [1] where onnx2tf 1.29.24 would fail.

    onnx2tf's accuracy correction (``correction_process_for_accuracy_errors``)
    runs on Add/Sub/Mul/Div/Mod whose output shape repeats a dimension > 1
    (attention scores ``[1, heads, seq, seq]``); it builds a Keras model whose
    outputs are the op's operands, and a 0-d constant arrives there as a Python
    float, which Keras refuses (seen on all-MiniLM-L6-v2's ``scores / sqrt(32)``).
    Against a computed operand of rank >= 1, shape [1] broadcasts exactly as
    shape [] does: same result, and onnx2tf keeps it as an array.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _Graph(out)
    inferred = onnx.shape_inference.infer_shapes(out).graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.value_info, *inferred.input, *inferred.output] if v.type.tensor_type.HasField("shape")}
    nodes: list[onnx.NodeProto] = []
    count = 0
    for n in out.graph.node:
        consts = [i for i in n.input if i in g.consts and g.consts[i].ndim == 0]
        computed = [i for i in n.input if i not in g.consts]
        dims = [d for d in shapes.get(n.output[0] if n.output else "", []) if d > 1]
        if (n.op_type not in _ELEMENTWISE or len(n.input) != 2 or len(consts) != 1 or len(computed) != 1
                or not shapes.get(computed[0]) or len(dims) == len(set(dims))):
            nodes.append(n)
            continue
        name = f"dscompile_vec{count}"
        vec = numpy_helper.from_array(g.consts[consts[0]].reshape(1), name)
        nodes.append(helper.make_node("Constant", [], [name], name=name, value=vec))
        nodes.append(helper.make_node(n.op_type, [name if i == consts[0] else i for i in n.input], list(n.output),
                                      name=n.name, domain=n.domain))
        nodes[-1].attribute.extend(n.attribute)
        count += 1
    if count:
        del out.graph.node[:]
        out.graph.node.extend(nodes)
    return out, count
