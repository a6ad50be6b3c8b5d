"""Run a .tflite with LiteRT (ai-edge-litert's Interpreter, XNNPACK on the CPU) on ONNX-shaped feeds.

A converted model does not take the ONNX model's tensors as they are: image
inputs are channels-last, names differ, and a quantized model may take int8.
The IoMap (kept inside the .tflite as metadata by the snapdragon target)
says, per ONNX input and output, which signature tensor it is and which axis
permutation turns one into the other; the runner applies it both ways so its
outputs compare with the ONNX model's directly.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dscompile.errors import InputError, MissingBackendError
from dscompile.profiles.host import host_label

IO_METADATA = "dscompile.io_map"
# The TFLite stack pins its dependencies exactly, so pip's resolver cannot install it as an extra:
# it comes from the lock, without dependency resolution (see README).
PIP_LINE = "pip install --no-deps -r requirements/snapdragon.lock"

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class IoBinding:
    """One model input or output: ONNX name, signature name, and ``tflite = onnx.transpose(perm)``."""

    onnx: str
    tflite: str
    perm: tuple[int, ...]
    dtype: str = "float32"

    def to_tflite(self, a: np.ndarray) -> np.ndarray:
        return np.transpose(a, self.perm) if self.perm else a

    def to_onnx(self, a: np.ndarray) -> np.ndarray:
        return np.transpose(a, np.argsort(self.perm)) if self.perm else a

    def to_json(self) -> dict[str, Any]:
        return {"onnx": self.onnx, "tflite": self.tflite, "perm": list(self.perm), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IoBinding:
        return cls(d["onnx"], d["tflite"], tuple(d["perm"]), d.get("dtype", "float32"))


@dataclass(frozen=True)
class IoMap:
    signature: str
    inputs: tuple[IoBinding, ...]
    outputs: tuple[IoBinding, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "signature": self.signature,
            "inputs": [b.to_json() for b in self.inputs],
            "outputs": [b.to_json() for b in self.outputs],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IoMap:
        return cls(
            d["signature"], tuple(IoBinding.from_json(b) for b in d["inputs"]),
            tuple(IoBinding.from_json(b) for b in d["outputs"]),
        )


@contextlib.contextmanager
def quiet_c_output() -> Iterator[None]:
    """Silence fds 1 and 2 (and sys.stdout/stderr) for the duration: LiteRT's C++ logs ("INFO: Created TensorFlow Lite
    XNNPACK delegate") would otherwise land in the middle of dscompile's output."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield  # and Python-level writes (progress bars) wherever sys.stdout/stderr point
    finally:
        for fd, old in zip((1, 2), saved, strict=True):
            os.dup2(old, fd)
            os.close(old)
        os.close(null)


def litert_version() -> str:
    from importlib.metadata import version

    return f"ai-edge-litert {version('ai-edge-litert')}"


def require_litert() -> None:
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        raise MissingBackendError("the LiteRT runtime (ai-edge-litert)", PIP_LINE) from None


def read_metadata(model: bytes, name: str) -> bytes | None:
    from ai_edge_litert import schema_py_generated as schema

    m = schema.Model.GetRootAs(model, 0)
    for i in range(m.MetadataLength()):
        md = m.Metadata(i)
        if md.Name() and md.Name().decode() == name:
            buf = m.Buffers(md.Buffer())
            if buf.DataLength():
                return buf.DataAsNumpy().tobytes()
            if buf.Offset() > 1:  # large models keep buffers after the flatbuffer, by offset
                return bytes(model[buf.Offset():buf.Offset() + buf.Size()])
            return b""
    return None


def read_io_map(model: bytes) -> IoMap | None:
    raw = read_metadata(model, IO_METADATA)
    return IoMap.from_json(json.loads(raw)) if raw else None


def quantize_input(a: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Float feed -> the integer type a quantized model's input takes (identity otherwise)."""
    dtype = np.dtype(detail["dtype"])
    scales = detail.get("quantization_parameters", {}).get("scales", np.zeros(0))
    if np.issubdtype(dtype, np.integer) and len(scales) and np.issubdtype(a.dtype, np.floating):
        zp = detail["quantization_parameters"]["zero_points"][0]
        info = np.iinfo(dtype)
        return np.clip(np.round(a / scales[0] + zp), info.min, info.max).astype(dtype)
    return a.astype(dtype, copy=False)


def dequantize_output(a: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scales = detail.get("quantization_parameters", {}).get("scales", np.zeros(0))
    if np.issubdtype(a.dtype, np.integer) and len(scales):
        zp = detail["quantization_parameters"]["zero_points"][0]
        return ((a.astype(np.float32) - zp) * scales[0]).astype(np.float32)
    return a


class LiteRTRunner:
    """ai-edge-litert Interpreter with its default XNNPACK CPU delegate."""

    def __init__(self, model: Path | str | bytes, io: IoMap | None = None, threads: int | None = None) -> None:
        require_litert()
        from ai_edge_litert.interpreter import Interpreter

        self.model = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.threads = threads
        self.io = io or read_io_map(self.model)
        try:
            self.interpreter = Interpreter(model_content=self.model, num_threads=threads)
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"LiteRT cannot load the model: {str(exc).strip().splitlines()[0][:300]}") from None
        sigs = self.interpreter.get_signature_list()
        if not sigs:
            raise InputError("the .tflite has no signature; LiteRT cannot tell its inputs apart")
        if self.io is None:
            self.io = _identity_io(sigs)
        self.signature = self.interpreter.get_signature_runner(self.io.signature)
        self.in_details = self.signature.get_input_details()
        self.out_details = self.signature.get_output_details()
        with quiet_c_output():  # the first invocation applies XNNPACK, which logs
            self.signature(**{k: np.zeros(d["shape"], d["dtype"]) for k, d in self.in_details.items()})

    def run(self, feed: Feed) -> list[np.ndarray]:
        assert self.io is not None
        args = {}
        for b in self.io.inputs:
            if b.onnx not in feed:
                raise InputError(f"inputs missing from the data: {b.onnx} (model inputs: {', '.join(x.onnx for x in self.io.inputs)})")
            args[b.tflite] = quantize_input(b.to_tflite(np.asarray(feed[b.onnx])), self.in_details[b.tflite])
        try:
            got = self.signature(**args)
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"LiteRT failed on the inputs: {str(exc).strip().splitlines()[0][:300]}") from None
        return [b.to_onnx(dequantize_output(got[b.tflite], self.out_details[b.tflite])) for b in self.io.outputs]

    def where(self) -> str:
        threads = f"{self.threads} threads" if self.threads else "default threads"
        return f"{litert_version()} Interpreter (XNNPACK CPU, {threads}) on {host_label()}"


def _identity_io(sigs: dict[str, dict[str, list[str]]]) -> IoMap:
    """A .tflite made elsewhere: signature names taken as ONNX names, no permutation."""
    key = next(iter(sigs))
    sig = sigs[key]
    return IoMap(
        key, tuple(IoBinding(n, n, ()) for n in sig["inputs"]), tuple(IoBinding(n, n, ()) for n in sig["outputs"])
    )
