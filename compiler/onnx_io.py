"""Saving ONNX models, with external data past protobuf's 2 GB limit."""

from __future__ import annotations

from pathlib import Path

import onnx

_PROTOBUF_LIMIT = 2_000_000_000


def save_model(model: onnx.ModelProto, path: Path) -> list[str]:
    """Write ``model`` to ``path`` (inside a staging folder); return the files written."""
    path = Path(path)
    if model.ByteSize() < _PROTOBUF_LIMIT:
        path.write_bytes(model.SerializeToString(deterministic=True))
        return [path.name]
    data = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
    return [path.name, data]


def new_session(model: onnx.ModelProto, options, providers=("CPUExecutionProvider",), disabled_optimizers=()):
    """An onnxruntime session for an in-memory model of any size.

    Models past protobuf's limit cannot be serialised to one buffer: they are
    written with external data to a private temporary folder and loaded from there.
    """
    import tempfile

    import onnxruntime as ort

    if model.ByteSize() < _PROTOBUF_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), options, providers=list(providers),
                                    disabled_optimizers=list(disabled_optimizers))
    with tempfile.TemporaryDirectory(prefix="dscompile-big-") as tmp:
        path = Path(tmp) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        save_model(copy, path)
        return ort.InferenceSession(str(path), options, providers=list(providers),
                                    disabled_optimizers=list(disabled_optimizers))
