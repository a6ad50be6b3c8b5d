"""ONNX -> float32 TFLite with onnx2tf, offline, in a private folder.

Why onnx2tf: it is the converter in the pinned stack (requirements/snapdragon.lock)
and it takes the ONNX graph every source already becomes in ingest, so torch
and ONNX models share one path; the litert-torch converter needs the torch
module and is not in the lock. The float TFLite is verified tensor by tensor
against onnxruntime afterwards (tflite_tensor_map), so a bad conversion is
caught whichever converter made it.

What this module guarantees about onnx2tf:
- it never sees the caller's file: it gets a copy in a private temp folder
  (it rewrites its input in place) and its onnxsim pass is off (the graph was
  simplified in ingest already);
- it never reaches the network: the sample-image file it would download is
  written into its working folder first, and sockets are blocked throughout;
- the onnx2tf 1.29.24 failures we have met are rewritten away first (tflite_prepare);
- its output (prints, TensorFlow's C++ logs) is captured, and a failure
  becomes one InputError naming the ONNX node.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import numpy as np
import onnx

from dscompile.compiler.graph import TensorSpec, graph_inputs
from dscompile.errors import InputError
from dscompile.targets.tflite_flatbuffer import with_signature
from dscompile.targets.tflite_prepare import (
    InputPlan,
    canonical_gelu,
    check_convertible,
    constant_first_sub,
    plan_inputs,
    scalar_operands_as_vectors,
    with_static_inputs,
)
from dscompile.targets.tflite_sandbox import captured_output, no_network, private_workdir

log = logging.getLogger("dscompile")

# The file onnx2tf.utils.common_functions.download_test_image_data() reads from
# the current folder, and downloads when it is absent (onnx2tf 1.29.24).
ONNX2TF_SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"
_SAMPLE_SHAPE = (20, 128, 128, 3)


@dataclass(frozen=True)
class FloatTflite:
    """A converted float32 model and what was done to get it."""

    model: bytes
    converter: str  # "onnx2tf 1.29.24"
    inputs: InputPlan
    gelu_fused: int  # exact-GELU patterns rewritten so they become the builtin GELU op
    erf_approximated: bool  # other Erf ops built from builtin ops
    network_attempts: tuple[str, ...]  # connection attempts refused during conversion (expected: none)


def onnx2tf_version() -> str:
    from importlib.metadata import version

    return f"onnx2tf {version('onnx2tf')}"


def sample_images() -> np.ndarray:
    """Deterministic stand-in for onnx2tf's downloadable sample images.

    onnx2tf only uses them to run its shape-estimation pass on image models;
    values in [0, 1) like the images it would fetch. Never used to calibrate.
    """
    return np.random.default_rng(0).random(_SAMPLE_SHAPE, dtype=np.float32)


def convert_onnx(model: onnx.ModelProto, specs: tuple[TensorSpec, ...]) -> FloatTflite:
    """Convert ``model`` (inputs described by ``specs``) to float32 TFLite bytes."""
    plan = plan_inputs(specs, graph_inputs(model))
    check_convertible(model)
    if plan.overwrite_shapes:
        model = with_static_inputs(model, specs)
    prepared, fused = canonical_gelu(model)
    prepared, _ = constant_first_sub(prepared)
    prepared, _ = scalar_operands_as_vectors(prepared)
    other_erf = sum(n.op_type == "Erf" for n in prepared.graph.node) > fused
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is first imported
    with private_workdir() as work, captured_output(work) as cap, no_network() as net:
        src = work / "model.onnx"
        src.write_bytes(prepared.SerializeToString())
        np.save(work / ONNX2TF_SAMPLE_FILE, sample_images())
        try:
            import onnx2tf

            keras_model = onnx2tf.convert(
                input_onnx_file_path=str(src),
                output_folder_path=str(work / "out"),
                not_use_onnxsim=True,
                keep_shape_absolutely_input_names=list(plan.keep_shape) or None,
                overwrite_input_shape=list(plan.overwrite_shapes) or None,
                replace_to_pseudo_operators=["erf"] if other_erf else None,
                disable_model_save=True,  # no SavedModel, no float16 copy: we convert once, below
                verbosity="info",
            )
            tflite = with_signature(keras_to_tflite(keras_model), [i.name for i in graph_inputs(prepared)],
                                    [o.name for o in prepared.graph.output])
        except (Exception, SystemExit) as exc:  # onnx2tf ends failures with sys.exit(1)
            text = cap.text()
            log.debug("onnx2tf output:\n%s", text)
            raise InputError(explain_failure(text, prepared, exc)) from None
    result = FloatTflite(tflite, onnx2tf_version(), plan, fused, other_erf, tuple(net.attempts))
    check_builtin_only(result.model, prepared)
    return result


def keras_to_tflite(model: object) -> bytes:
    """The float32 TFLite conversion onnx2tf itself runs (onnx2tf.py, "Float32 tflite output").

    Select-TF ops stay allowed so a non-builtin op converts and is then named
    by ``check_builtin_only`` instead of failing inside the converter.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    converter.unfold_batchmatmul = False
    return bytes(converter.convert())


_OP_NAME = re.compile(r"onnx_op_name: (\S+)")
_NOT_IMPLEMENTED = re.compile(r"(\w+) OP is not yet implemented")


def explain_failure(text: str, model: onnx.ModelProto, exc: BaseException) -> str:
    """One line: which ONNX node onnx2tf failed on, and its last error."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    names = _OP_NAME.findall(plain)
    missing = _NOT_IMPLEMENTED.findall(plain)
    by_name = {n.name: n for n in model.graph.node}
    node = by_name.get(names[-1].removeprefix("wa/")) if names else None
    if node is None and missing:
        node = next((n for n in model.graph.node if n.op_type == missing[-1]), None)
    cause = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
    if node is not None:
        return f"ONNX node {node.name!r} ({node.op_type}) could not be converted to TFLite by onnx2tf: {cause}"
    return f"onnx2tf could not convert the model: {cause}"


def check_builtin_only(tflite: bytes, model: onnx.ModelProto) -> None:
    """Refuse select-TF ("Flex") ops: LiteRT's builtin runtime and the NPU cannot run them."""
    from dscompile.targets.tflite_flatbuffer import flex_ops

    flex = flex_ops(tflite)
    if not flex:
        return
    op, tensor = flex[0]
    names = sorted((n.name for n in model.graph.node if n.name and n.name in tensor), key=len, reverse=True)
    where = f"ONNX node {names[0]!r}" if names else f"the op producing TFLite tensor {tensor!r}"
    raise InputError(
        f"{where} has no TFLite builtin equivalent (it became the select-TF op {op}, "
        "which LiteRT's builtin interpreter and the Hexagon NPU cannot run)"
    )
