"""Make a model ready for quantised lowering: unique node names, opset >= 13.

Both steps are deterministic, so a plan made on one run names the same nodes
as the build on the next. Quantised graphs need opset 13 (per-channel
DequantizeLinear); older models are upgraded with onnx's version converter.
"""

from __future__ import annotations

import onnx

from dscompile.errors import InputError

MIN_OPSET = 13


def onnx_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed or duplicate node a stable name ``<op>_<index>`` (in place)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name
        if not name or name in seen:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
        seen.add(name)
    return model


def upgrade_opset(model: onnx.ModelProto, version: int = MIN_OPSET) -> onnx.ModelProto:
    if onnx_opset(model) >= version:
        return model
    try:
        from onnx import version_converter

        return version_converter.convert_version(model, version)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot upgrade the model from opset {onnx_opset(model)} to {version}: {text}") from None


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with opset >= 13 and unique node names."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out = upgrade_opset(out)
    return name_nodes(out)
