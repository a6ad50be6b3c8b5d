"""Reading and annotating .tflite flatbuffers (LiteRT's generated schema; lazy imports)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_TENSOR_TYPES = {
    0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 5: "string", 6: "bool", 7: "int16",
    9: "int8", 10: "float64", 15: "uint32", 16: "uint16", 17: "int4", 18: "bfloat16",
}


@dataclass(frozen=True)
class TflTensor:
    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    constant: bool  # holds data in the file (weights, biases, shapes)
    quantized: bool  # carries scale/zero-point
    quantized_dim: int = 0
    channels: int = 0  # number of scales (> 1: per-channel)


@dataclass(frozen=True)
class TflOp:
    index: int
    name: str  # builtin name ("CONV_2D") or custom code ("FlexErf")
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class TflGraph:
    """The main subgraph of a .tflite model: its ops in execution order and its tensors."""

    ops: tuple[TflOp, ...]
    tensors: tuple[TflTensor, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    def producer(self) -> dict[int, TflOp]:
        return {t: op for op in self.ops for t in op.outputs}

    def consumers(self) -> dict[int, list[TflOp]]:
        users: dict[int, list[TflOp]] = {}
        for op in self.ops:
            for t in op.inputs:
                if t >= 0:
                    users.setdefault(t, []).append(op)
        return users


def _builtin_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def read_graph(model: bytes) -> TflGraph:
    """Ops and tensors of subgraph 0 (the one the default signature runs)."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.Model.GetRootAs(model, 0)
    names = _builtin_names()
    sg = m.Subgraphs(0)
    ops = []
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        code = m.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        custom = code.CustomCode()
        name = custom.decode() if custom else names.get(builtin, f"BUILTIN_{builtin}")
        ops.append(TflOp(i, name, tuple(int(x) for x in op.InputsAsNumpy()), tuple(int(x) for x in op.OutputsAsNumpy())))
    tensors = []
    for i in range(sg.TensorsLength()):
        t = sg.Tensors(i)
        buf = m.Buffers(t.Buffer()) if t.Buffer() < m.BuffersLength() else None
        has_data = buf is not None and (buf.DataLength() > 0 or buf.Size() > 1)
        q = t.Quantization()
        scales = q.ScaleLength() if q is not None else 0
        shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        tensors.append(TflTensor(
            i, t.Name().decode(), _TENSOR_TYPES.get(t.Type(), f"type{t.Type()}"), shape, has_data, scales > 0,
            q.QuantizedDimension() if q is not None else 0, scales,
        ))
    return TflGraph(
        tuple(ops), tuple(tensors),
        tuple(int(x) for x in sg.InputsAsNumpy()), tuple(int(x) for x in sg.OutputsAsNumpy()),
    )


def flex_ops(model: bytes) -> list[tuple[str, str]]:
    """(op name, first output tensor name) of every select-TF op in the model."""
    g = read_graph(model)
    return [
        (op.name, g.tensors[op.outputs[0]].name if op.outputs else "")
        for op in g.ops if op.name.startswith("Flex")
    ]


def attach_metadata(model: bytes, name: str, data: bytes) -> bytes:
    """The model with a metadata entry ``name`` holding ``data`` (replacing one of that name)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    obj = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    obj.metadata = [md for md in (obj.metadata or []) if _text(md.name) != name]
    buf = schema.BufferT()
    buf.data = np.frombuffer(data, dtype=np.uint8).copy()
    obj.buffers.append(buf)
    md = schema.MetadataT()
    md.name = name
    md.buffer = len(obj.buffers) - 1
    obj.metadata.append(md)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(obj))


def with_signature(model: bytes, inputs: list[str], outputs: list[str], key: str = "serving_default") -> bytes:
    """The model with a default signature over subgraph 0 when it has none.

    TensorFlow's Keras converter drops signatures when it cannot export the
    model as a SavedModel first (onnx2tf's layers can hold variables it does not
    track, e.g. PP-OCRv4's convolutions) and falls back to a frozen graph.
    LiteRT's signature runner, ai-edge-quantizer and our I/O map all need one:
    the subgraph's inputs and outputs, in order, under the ONNX names given.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    obj = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    if obj.signatureDefs:
        return model
    sg = obj.subgraphs[0]
    if len(sg.inputs) != len(inputs) or len(sg.outputs) != len(outputs):
        raise ValueError(f"subgraph has {len(sg.inputs)} inputs / {len(sg.outputs)} outputs, "
                         f"the source {len(inputs)} / {len(outputs)}")

    def entries(names: list[str], indices) -> list:
        out = []
        for name, index in zip(names, indices, strict=True):
            tm = schema.TensorMapT()
            tm.name, tm.tensorIndex = name, int(index)
            out.append(tm)
        return out

    sig = schema.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = key, 0
    sig.inputs, sig.outputs = entries(inputs, sg.inputs), entries(outputs, sg.outputs)
    obj.signatureDefs = [sig]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(obj))


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")
