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
