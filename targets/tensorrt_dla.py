"""DLA eligibility on Orin: which nodes of the Q/DQ graph the DLA would run, and why the rest go to the GPU.

Rules are data (``rules/tensorrt_dla.toml``, from TensorRT's "DLA Supported Layers and
Restrictions"): DLA runs FP16 and INT8 only, a fixed layer subset with size limits, static
shapes only. With --allowGPUFallback (which build_engine.sh passes) the rest runs on the GPU.
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx import TensorProto

from dscompile.compiler.layers import GraphIndex, tensor_types
from dscompile.errors import InputError
from dscompile.targets.tensorrt_rules import _attr, _const, dq_source
from dscompile.targets.tensorrt_shapes import Profile
from dscompile.targets.tensorrt_versions import load_rules

_PLUMBING = ("QuantizeLinear", "DequantizeLinear", "Cast", "Constant", "Identity")


def node_precision(node: onnx.NodeProto, index: GraphIndex, types: dict[str, int]) -> str:
    """int8 when a data input arrives through DequantizeLinear, else the float type of the first input."""
    data = [i for i in node.input if i and not index.is_constant(i)]
    if any(dq_source(index, i) is not None and index.producer[i].op_type == "DequantizeLinear" for i in data):
        return "int8"
    t = types.get(data[0]) if data else None
    return {TensorProto.FLOAT16: "fp16", TensorProto.FLOAT: "fp32"}.get(t, "other")


def _limits(node: onnx.NodeProto, rule: dict[str, Any], index: GraphIndex, shapes: dict) -> str:
    """Why this node breaks its DLA layer's limits ('' when it does not)."""
    w = None
    if node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm") and len(node.input) > 1:
        dq = dq_source(index, node.input[1])
        w = _const(index, dq.input[0] if dq is not None else node.input[1])
    if rule.get("constant_weights") and w is None:
        return "a MatMul of two activations is not a DLA layer"
    if rule.get("constant_slope") and _const(index, node.input[1]) is None:
        return "PRelu slope must be a build-time constant on DLA"
    x = shapes.get(node.input[0]) if node.input else None
    if rule.get("spatial_rank") and x is not None and len(x) != 2 + rule["spatial_rank"]:
        return f"DLA runs {rule['spatial_rank']}-D {rule['layer']} only (input rank {len(x)})"
    if w is not None and rule.get("channels_max") and max(w.shape[:2]) > rule["channels_max"]:
        return f"more than {rule['channels_max']} channels"
    kernel = _attr(node, "kernel_shape") or (list(w.shape[2:]) if w is not None and w.ndim > 2 else [])
    if rule.get("kernel_max") and any(k > rule["kernel_max"] for k in kernel):
        return f"kernel {kernel} larger than {rule['kernel_max']}"
    if rule.get("stride_max") and any(s > rule["stride_max"] for s in _attr(node, "strides", []) or []):
        return f"stride larger than {rule['stride_max']}"
    if rule.get("group") is False and _attr(node, "group", 1) != 1:
        return "grouped deconvolution"
    if rule.get("dilation") is False and any(d != 1 for d in _attr(node, "dilations", []) or []):
        return "dilated deconvolution"
    if rule.get("pads_zero") and any(p != 0 for p in _attr(node, "pads", []) or []):
        return "deconvolution padding must be 0"
    if rule.get("axis") == "channel" and x is not None:
        axis = _attr(node, "axis", 1 if node.op_type == "Concat" else -1)
        if axis % len(x) != 1:
            return f"axis {axis} is not the channel axis"
    if rule.get("modes") and (mode := _attr(node, "mode", b"nearest")):
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in rule["modes"]:
            return f"resize mode {mode!r}"
    return ""


def dla_placement(
    model: onnx.ModelProto, core: int, cores_on_device: int, device: str, profile: Profile | None,
    shapes: dict[str, tuple[int, ...]],
) -> dict[str, Any]:
    """Per node: DLA or GPU (with the reason), for ``--dla CORE``."""
    if cores_on_device <= 0:
        raise InputError(f"--dla {core}: device {device} has no DLA (its profile's dla_cores figure is 0)")
    if not 0 <= core < cores_on_device:
        raise InputError(f"--dla {core}: device {device} has DLA cores 0..{cores_on_device - 1}")
    rules = load_rules("tensorrt_dla")
    general, table = rules["general"], rules["ops"]
    index = GraphIndex.of(model)
    types = tensor_types(model)
    static = not profile or all(profile["min"][n] == profile["max"][n] for n in profile["min"])
    dla, gpu = [], []
    for node in model.graph.node:
        if node.op_type in _PLUMBING:
            continue
        name = node.name or node.output[0]
        why = _gpu_reason(node, table, general, index, types, shapes, static)
        if why:
            gpu.append({"node": name, "op": node.op_type, "reason": why})
        else:
            dla.append({"node": name, "op": node.op_type, "layer": table[node.op_type]["layer"],
                        "precision": node_precision(node, index, types)})
    return {
        "core": core, "cores_on_device": cores_on_device, "gpu_fallback": True,
        "counts": {"dla": len(dla), "gpu": len(gpu)}, "dla_nodes": dla, "gpu_nodes": gpu,
        "source": rules["source"],
    }


def _gpu_reason(node, table, general, index, types, shapes, static) -> str:
    if not static:
        return "DLA needs static shapes (the --shapes profile's min and max differ)"
    rule = table.get(node.op_type)
    if rule is None:
        return "not a layer DLA runs"
    precision = node_precision(node, index, types)
    if precision not in general["precisions"]:
        return f"{precision} layer: DLA runs {'/'.join(p.upper() for p in general['precisions'])} only"
    out = shapes.get(node.output[0])
    if out and len(out) > 1 and max(out[1:]) > general["max_dim"]:
        return f"a dimension above {general['max_dim']}"
    return _limits(node, rule, index, shapes)

