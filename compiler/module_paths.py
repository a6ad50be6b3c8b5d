"""Which torch module each exported ONNX node came from, read from the exporter's name scopes.

Taken at export time, before simplification drops the scopes; DMPQ's layers and the plan carry it.
"""

from __future__ import annotations

import onnx


def layer_map(model: onnx.ModelProto) -> dict[str, str]:
    """ONNX node name -> torch module path, from the exporter's name scopes."""
    out: dict[str, str] = {}
    inits = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        # A fused node (Conv+BN) carries the BN's scope; its weight keeps the torch parameter's name.
        weight = next((i for i in node.input[1:] if i in inits and i.endswith(".weight")), None)
        if weight:
            path = weight.removesuffix(".weight")
        elif "namespace" in meta:
            path = _module_from_namespace(meta["namespace"])
        else:
            path = _module_from_name(node.name)
        if path:
            out[node.name] = path
    return out


def _module_from_namespace(ns: str) -> str:
    # ": pkg.Model/fc: torch.nn.modules.linear.Linear/linear: aten.linear.default"
    parts = []
    for seg in ns.split("/")[1:]:
        name, _, cls = seg.partition(": ")
        if cls.startswith(("aten.", "prims.", "<built-in")) or not name:
            continue
        parts.append(name.strip())
    return ".".join(parts)


def _module_from_name(name: str) -> str:
    # TorchScript exporter: "/layer1/conv/Conv"
    parts = [p for p in name.split("/") if p][:-1]
    return ".".join(parts)
