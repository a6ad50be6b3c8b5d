"""The public Python API: one function per command, each taking and returning values.

    from dscompile import api
    result = api.compile("model.pt", target="ort-cpu", input_shapes=["x:1x3x224x224"], output="m.onnx")
    info = api.inspect("model.onnx")
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from dscompile.compiler.graph import graph_inputs, graph_outputs, macs, parameter_stats
from dscompile.compiler.ingest import IngestOptions, detect_format, ingest, load_onnx
from dscompile.compiler.shapes import parse_input_shape
from dscompile.pipeline import CompileOptions, CompileResult, compile_model

__all__ = ["CompileOptions", "CompileResult", "IngestOptions", "compile", "inspect", "profile"]


def compile(
    model: str | Path,
    target: str = "ort-cpu",
    output: str | Path | None = None,
    input_shapes: list[str] | None = None,
    options: CompileOptions | None = None,
    **overrides: Any,
) -> CompileResult:
    """Compile ``model`` for ``target``; ``overrides`` set CompileOptions fields."""
    opts = options or CompileOptions()
    if input_shapes:
        ing = replace(opts.ingest, input_shapes=tuple(parse_input_shape(s, i) for i, s in enumerate(input_shapes)))
        opts = replace(opts, ingest=ing)
    opts = replace(opts, target=target, output=Path(output) if output else opts.output, **overrides)
    return compile_model(model, opts)


def inspect(model: str | Path, options: IngestOptions | None = None) -> dict[str, Any]:
    """Ops by type, parameters, bytes, MACs, inputs and outputs of a model.

    ONNX files are read as they are; torch sources are exported first (and need
    their input shapes in ``options``).
    """
    path = Path(model)
    fmt = detect_format(path)
    if fmt == "onnx":
        onnx_model = load_onnx(path)
        ins, outs = graph_inputs(onnx_model), graph_outputs(onnx_model)
    else:
        graph = ingest(path, replace(options or IngestOptions(), check=False)).graph
        onnx_model, ins, outs = graph.model, graph.inputs, graph.outputs
    from collections import Counter

    params, nbytes = parameter_stats(onnx_model)
    opsets = {op.domain or "ai.onnx": op.version for op in onnx_model.opset_import}
    return {
        "path": str(path),
        "format": fmt,
        "opsets": opsets,
        "inputs": [s.to_json() for s in ins],
        "outputs": [s.to_json() for s in outs],
        "ops": dict(sorted(Counter(n.op_type for n in onnx_model.graph.node).items(), key=lambda kv: -kv[1])),
        "nodes": len(onnx_model.graph.node),
        "parameters": params,
        "parameter_bytes": nbytes,
        "macs": macs(onnx_model),
    }


def profile(
    paths: list[str | Path],
    devices: list[str] | None = None,
    precisions: list[str] | None = None,
    batches: list[int] | None = None,
    output: str | Path | None = None,
    force: bool = False,
    options: Any = None,
) -> Any:
    """The FPS matrix of models/artifacts on devices; written to ``output`` (a folder) when given.

    ``options`` is a ``dscompile.profiler.ProfileOptions``; the other arguments override its fields.
    """
    from dscompile import profiler
    from dscompile.profiles.devices import THIS_CPU, get_device
    from dscompile.profiles.matrix import save_matrix

    opts = options or profiler.ProfileOptions()
    overrides: dict[str, Any] = {}
    if devices:
        overrides["devices"] = tuple(devices)
    if precisions:
        overrides["precisions"] = tuple(precisions)
    if batches:
        overrides["batches"] = tuple(batches)
    opts = replace(opts, **overrides)
    for d in opts.devices:
        if d != THIS_CPU:
            get_device(d)  # unknown names fail here, listing the known ones, before any work
    if output is not None:
        from dscompile.fileio import check_writable

        check_writable(output, force)
    matrix = profiler.profile_paths([Path(p) for p in paths], opts)
    if output is not None:
        save_matrix(matrix, output, force)
    return matrix
