"""ModelGraph: the ONNX model every stage after ingest works on."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

Dim = int | str

_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, shape (ints, or names for dynamic axes), numpy dtype."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) and d > 0 for d in self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class SourceInfo:
    """Where a model came from: path, sha256 of the file, detected format."""

    path: str
    sha256: str
    format: str  # onnx | torchscript | torch-export | pickle

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256, "format": self.format}


@dataclass(frozen=True, eq=False)
class ModelGraph:
    """An ONNX model with its input specs, content hash and provenance.

    ``layer_map`` maps ONNX node names to the torch module path they came from
    (empty for ONNX sources); it is taken before simplification, which drops
    node metadata.
    """

    model: onnx.ModelProto
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    source: SourceInfo
    layer_map: dict[str, str] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return model_sha256(self.model)

    def initializers(self) -> dict[str, onnx.TensorProto]:
        return {t.name: t for t in self.model.graph.initializer}

    def op_census(self) -> dict[str, int]:
        return dict(sorted(Counter(n.op_type for n in self.model.graph.node).items()))


def model_sha256(model: onnx.ModelProto) -> str:
    """Content hash of a model: the serialized graph and opsets, not producer fields."""
    from dscompile.compiler.onnx_io import hash_on_disk, weights_dir

    h = hashlib.sha256()
    for op in model.opset_import:
        h.update(f"{op.domain}:{op.version};".encode())
    if weights_dir(model) is not None:  # weights past protobuf's limit are hashed from their files
        hash_on_disk(model, h)
    else:
        h.update(model.graph.SerializeToString(deterministic=True))
    return h.hexdigest()


def value_spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    tt = vi.type.tensor_type
    dims: list[Dim] = []
    for i, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or f"{vi.name}_dim{i}")
    return TensorSpec(vi.name, tuple(dims), _ONNX_TO_NUMPY.get(tt.elem_type, "float32"))


def graph_inputs(model: onnx.ModelProto) -> tuple[TensorSpec, ...]:
    inits = {t.name for t in model.graph.initializer}
    return tuple(value_spec(v) for v in model.graph.input if v.name not in inits)


def graph_outputs(model: onnx.ModelProto) -> tuple[TensorSpec, ...]:
    return tuple(value_spec(v) for v in model.graph.output)


def parameter_stats(model: onnx.ModelProto) -> tuple[int, int]:
    """(parameter count, bytes) over the float initializers."""
    count = nbytes = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            count += n
        nbytes += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return count, nbytes


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes onnx's shape inference could make fully static, by tensor name."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # shape inference is advisory: an unusual model still inspects
        inferred = model
    shapes: dict[str, tuple[int, ...]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(int(d.dim_value) for d in dims)
    for t in g.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


def node_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-accumulates of one node where shapes are known, else 0."""
    out = shapes.get(node.output[0]) if node.output else None
    if out is None:
        return 0
    if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 and node.input[1] in shapes:
        w = shapes[node.input[1]]
        per_out = int(np.prod(w[1:]))  # (Cin/groups) * kh * kw
        if node.op_type == "ConvTranspose":
            x = shapes.get(node.input[0])
            return int(np.prod(x)) * int(np.prod(w[1:])) if x else 0
        return int(np.prod(out)) * per_out
    if node.op_type in ("MatMul", "Gemm", "MatMulInteger", "MatMulNBits"):
        a = shapes.get(node.input[0])
        if not a:
            return 0
        k = a[-1]
        if node.op_type == "Gemm":
            trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
        return int(np.prod(out)) * int(k)
    return 0


def macs(model: onnx.ModelProto) -> int:
    shapes = static_shapes(model)
    return sum(node_macs(n, shapes) for n in model.graph.node)


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return None
