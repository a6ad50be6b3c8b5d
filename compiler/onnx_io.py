"""Saving and running ONNX models, with external data past protobuf's 2 GB limit.

A model whose weights would not fit one protobuf message stays as loaded from disk: its external
tensors keep pointing into their files, and the model carries the folder those files are in
(``WEIGHTS_DIR_KEY`` in its metadata). Loading those weights into the message would mean a second
copy of them the moment anything serialises it; instead onnxruntime reads them from the folder, saving
streams them file to file, and the content hash reads them in chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
from onnx.external_data_helper import _get_all_tensors, uses_external_data

_PROTOBUF_LIMIT = 2_000_000_000
WEIGHTS_DIR_KEY = "dscompile.weights_dir"
_ALIGN = 4096  # page-aligned tensors: onnxruntime can map them instead of copying
_CHUNK = 1 << 24


def past_protobuf_limit(nbytes: int) -> bool:
    return nbytes >= _PROTOBUF_LIMIT


def weights_dir(model: onnx.ModelProto) -> Path | None:
    """The folder of the model's external weights when they stay on disk, else None (weights in memory)."""
    return next((Path(p.value) for p in model.metadata_props if p.key == WEIGHTS_DIR_KEY), None)


def keep_weights_on_disk(model: onnx.ModelProto, folder: Path) -> None:
    """Mark ``model`` (external tensors not loaded) as reading its weights from ``folder``."""
    entry = model.metadata_props.add()
    entry.key, entry.value = WEIGHTS_DIR_KEY, str(Path(folder).resolve())


def external_info(t: onnx.TensorProto) -> tuple[str, int, int | None]:
    """(location, offset, length or None) of an external tensor."""
    info = {e.key: e.value for e in t.external_data}
    return info["location"], int(info.get("offset") or 0), int(info["length"]) if info.get("length") else None


def external_chunks(folder: Path, t: onnx.TensorProto) -> Iterator[bytes]:
    """The bytes of an external tensor, read in chunks."""
    location, offset, length = external_info(t)
    with open(folder / location, "rb") as f:
        f.seek(offset)
        left = length if length is not None else float("inf")
        while left > 0:
            chunk = f.read(int(min(_CHUNK, left)))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk


def hash_on_disk(model: onnx.ModelProto, h: Any) -> None:
    """Add the graph (references, not weights) and every external tensor's bytes to ``h``."""
    folder = weights_dir(model)
    h.update(model.graph.SerializeToString(deterministic=True))
    for t in _get_all_tensors(model):
        if folder is not None and uses_external_data(t):
            h.update(t.name.encode())
            for chunk in external_chunks(folder, t):
                h.update(chunk)


def save_model(model: onnx.ModelProto, path: Path) -> list[str]:
    """Write ``model`` to ``path`` (inside a staging folder); return the files written."""
    path = Path(path)
    if weights_dir(model) is not None:
        return _save_from_disk(model, path)
    if model.ByteSize() < _PROTOBUF_LIMIT:
        path.write_bytes(model.SerializeToString(deterministic=True))
        return [path.name]
    data = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
    return [path.name, data]


def _save_from_disk(model: onnx.ModelProto, path: Path) -> list[str]:
    """A model whose weights stay on disk: copy them file to file into ``path``.data, one tensor at a time."""
    folder = weights_dir(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)  # small: the weights are references
    keep = [p for p in out.metadata_props if p.key != WEIGHTS_DIR_KEY]
    del out.metadata_props[:]
    out.metadata_props.extend(keep)
    data = path.with_name(path.name + ".data")
    offset = 0
    with open(data, "wb") as f:
        for t in _get_all_tensors(out):
            if not uses_external_data(t):
                continue
            f.seek(offset)
            length = 0
            for chunk in external_chunks(folder, t):
                f.write(chunk)
                length += len(chunk)
            del t.external_data[:]
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(length))):
                e = t.external_data.add()
                e.key, e.value = key, value
            offset += -(-length // _ALIGN) * _ALIGN
    path.write_bytes(out.SerializeToString(deterministic=True))
    return [path.name, data.name]


def new_session(model: onnx.ModelProto, options, providers=("CPUExecutionProvider",), disabled_optimizers=()):
    """An onnxruntime session for an in-memory model of any size.

    Weights kept on disk are read by onnxruntime from their folder. Other models past protobuf's limit
    cannot be serialised to one buffer: they are written with external data to a private temporary folder
    and loaded from there.
    """
    import tempfile

    import onnxruntime as ort

    folder = weights_dir(model)
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        return ort.InferenceSession(model.SerializeToString(), options, providers=list(providers),
                                    disabled_optimizers=list(disabled_optimizers))
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
