"""onnxruntime sessions for the stages that execute ONNX (checks, sensitivity, verification)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from dscompile.errors import InputError

Feed = dict[str, np.ndarray]


def session_options(threads: int | None = None, optimize: bool = True,
                    config: tuple[tuple[str, str], ...] = ()) -> ort.SessionOptions:
    """``config``: onnxruntime session config entries (key, value), e.g. ``session.disable_quant_qdq``."""
    so = ort.SessionOptions()
    for key, value in config:
        so.add_session_config_entry(key, value)
    so.log_severity_level = 4  # its errors reach the user as our one line, not also as its own log line
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so


def ort_session(
    model: onnx.ModelProto | str | os.PathLike, threads: int | None = None, optimize: bool = True,
    disabled_optimizers: tuple[str, ...] = (), config: tuple[tuple[str, str], ...] = (),
) -> ort.InferenceSession:
    """A CPU session; ``disabled_optimizers`` names graph transformers to skip (onnxruntime's names),
    ``config`` is session config entries (key, value)."""
    options = session_options(threads, optimize, config)
    try:
        if isinstance(model, (str, Path)):
            return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"],
                                        disabled_optimizers=list(disabled_optimizers))
        from dscompile.compiler.onnx_io import new_session

        return new_session(model, options, disabled_optimizers=disabled_optimizers)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:300]
        raise InputError(f"onnxruntime cannot load the model: {text}") from None


def run_session(sess: ort.InferenceSession, feed: Feed) -> list[np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    missing = names - feed.keys()
    if missing:
        raise InputError(f"inputs missing from the data: {', '.join(sorted(missing))} (model inputs: {', '.join(sorted(names))})")
    try:
        return sess.run(None, {k: v for k, v in feed.items() if k in names})
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:300]
        raise InputError(f"onnxruntime failed on the inputs: {text}") from None


def ort_version() -> str:
    return ort.__version__
