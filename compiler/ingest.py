"""Load a model file (TorchScript, torch.export, pickled nn.Module, ONNX) into a ModelGraph.

The format is read from the file's content, never its name. Torch sources are
exported to ONNX (dynamo exporter; TorchScript exporter for TorchScript), the
torch module path of every node is kept before simplification drops it, and the
export is checked against torch on sample inputs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import re
import sys
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from dscompile.compiler.graph import (
    ModelGraph,
    SourceInfo,
    TensorSpec,
    graph_inputs,
    graph_outputs,
)
from dscompile.compiler.module_paths import layer_map
from dscompile.compiler.onnx_io import (
    external_info,
    keep_weights_on_disk,
    past_protobuf_limit,
    weights_dir,
)
from dscompile.compiler.samples import synthetic_feeds
from dscompile.compiler.shapes import name_positional, override_specs, with_dynamic
from dscompile.errors import InputError, VerificationError
from dscompile.fileio import sha256_file

OPSET = 18
FORMATS = ("onnx", "torchscript", "torch-export", "pickle")


@dataclass(frozen=True)
class IngestOptions:
    input_shapes: tuple[TensorSpec, ...] = ()
    dynamic: dict[str, tuple[int, ...]] = field(default_factory=dict)
    trust_pickle: bool = False
    simplify: bool = True
    check: bool = True
    export_rtol: float = 1e-3
    check_samples: int = 4
    seed: int = 0


@dataclass(frozen=True, eq=False)
class Ingested:
    """The ModelGraph plus the torch module it came from (None for ONNX)."""

    graph: ModelGraph
    torch_module: Any = None
    export_check: dict[str, Any] = field(default_factory=dict)


def detect_format(path: Path) -> str:
    """onnx | torchscript | torch-export | pickle, from the bytes; InputError otherwise."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a model file")
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        raise InputError(f"{path}: empty file")
    if head[:4] == b"PK\x03\x04":
        return _zip_format(path)
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "pickle"
    if _looks_like_text(head):
        raise InputError(f"{path}: is a text file, not a model (expected ONNX, TorchScript, .pt2 or a pickled module)")
    return "onnx"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def _zip_format(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, zlib.error) as exc:
        raise InputError(f"{path}: corrupt zip archive ({exc})") from None
    if bad is not None:
        raise InputError(f"{path}: corrupt zip archive (bad CRC in {bad})")
    for n in names:
        if n.startswith("/") or ".." in Path(n).parts:
            raise InputError(f"{path}: archive entry {n!r} points outside the archive; refusing it")
    if any(n.endswith("/archive_format") for n in names) or any("/models/" in n and n.endswith(".json") for n in names):
        return "torch-export"
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "pickle"
    raise InputError(f"{path}: a zip archive that is neither TorchScript, torch.export nor torch.save output")


def load_onnx(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others
        raise InputError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{path}: not a readable ONNX model (no graph)")
    _check_topology(model, path)  # before the checker: its message for these names no node
    external = _check_external(model, path)
    if past_protobuf_limit(model.ByteSize() + external):
        # Past protobuf's limit the weights stay in their files: in the message they would be copied again
        # by every serialisation (the checker's, the hash's, onnxruntime's), and could not be serialised.
        _check_model(str(path), path)
        keep_weights_on_disk(model, path.resolve().parent)
    else:
        try:
            onnx.load_external_data_for_model(model, str(path.resolve().parent))
        except Exception as exc:
            raise InputError(f"{path}: cannot read external data ({_first_line(exc)})") from None
        _check_model(model, path)
    return model


def _check_model(model: onnx.ModelProto | str, path: Path) -> None:
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as exc:
        raise InputError(f"{path}: invalid ONNX model ({_first_line(exc)})") from None


def _check_external(model: onnx.ModelProto, path: Path) -> int:
    """Every external tensor's file lies in the model's folder and exists; returns their bytes in all."""
    base = path.resolve().parent
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    total = 0
    for t in _get_all_tensors(model):
        if not uses_external_data(t):
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (base / loc).resolve()
        if base not in target.parents:
            raise InputError(f"{path}: external data {loc!r} of tensor {t.name!r} lies outside the model's folder")
        if not target.is_file():
            raise InputError(f"{path}: external data file {loc!r} of tensor {t.name!r} is missing")
        try:
            length = external_info(t)[2]
        except (KeyError, ValueError):
            raise InputError(f"{path}: tensor {t.name!r} has malformed external data fields") from None
        total += target.stat().st_size if length is None else length
    return total


def _check_topology(model: onnx.ModelProto, path: Path) -> None:
    """Every node input must be produced before it is used (no dangling inputs, no cycles)."""
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    for node in model.graph.node:
        for name in node.input:
            if name not in known:
                raise InputError(
                    f"{path}: node {node.name or node.op_type!r} reads {name!r}, which nothing produces before it "
                    "(a dangling input or a cycle)"
                )
        known.update(node.output)


def _first_line(exc: BaseException) -> str:
    """The line of an exception's message that says what went wrong."""
    lines = [ln.strip() for ln in (str(exc).strip() or type(exc).__name__).splitlines() if ln.strip()]
    # TorchScript puts a generic header first and the real error ("RuntimeError: ...") last.
    if len(lines) > 1 and "TorchScript interpreter" in lines[0]:
        return lines[-1][:300]
    return lines[0][:300]


def ingest(path: str | os.PathLike, options: IngestOptions = IngestOptions()) -> Ingested:
    p = Path(path)
    fmt = detect_format(p)
    source = SourceInfo(str(p), sha256_file(p), fmt)
    if fmt == "onnx":
        return _ingest_onnx(p, source, options)
    module, example = _load_torch(p, fmt, options)
    specs = _torch_specs(p, module, example, options)
    model, layer_map = export_to_onnx(module, specs, fmt, p)
    if options.simplify:
        model = simplify(model)
    graph = ModelGraph(model, graph_inputs_named(model, specs), graph_outputs(model), source, layer_map)
    check = check_export(module, graph, options) if options.check else {}
    return Ingested(graph, module, check)


def _ingest_onnx(p: Path, source: SourceInfo, options: IngestOptions) -> Ingested:
    model = load_onnx(p)
    if options.simplify:
        model = simplify(model)
    specs = override_specs(graph_inputs(model), list(options.input_shapes))
    specs = tuple(with_dynamic(s, options.dynamic[s.name]) if s.name in options.dynamic else s for s in specs)
    return Ingested(ModelGraph(model, specs, graph_outputs(model), source))


def graph_inputs_named(model: onnx.ModelProto, specs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
    """The exported graph's inputs, with the user's concrete shapes where dims are dynamic."""
    onnx_specs = graph_inputs(model)
    return tuple(
        TensorSpec(o.name, s.shape if any(isinstance(d, str) for d in o.shape) else o.shape, o.dtype)
        for o, s in zip(onnx_specs, specs, strict=False)
    )


def _load_torch(p: Path, fmt: str, options: IngestOptions) -> tuple[Any, tuple | None]:
    import torch

    try:
        if fmt == "torchscript":
            return torch.jit.load(str(p), map_location="cpu").eval(), None
        if fmt == "torch-export":
            ep = torch.export.load(str(p))
            example = getattr(ep, "example_inputs", None)
            return ep, (example[0] if example else None)
    except Exception as exc:
        raise InputError(f"{p}: cannot load {fmt} archive ({_first_line(exc)})") from None
    return _load_pickle(p, options.trust_pickle), None


def _load_pickle(p: Path, trusted: bool) -> Any:
    import torch

    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        obj = None
    except Exception as exc:
        raise InputError(f"{p}: cannot read pickle ({_first_line(exc)})") from None
    if isinstance(obj, dict):
        raise InputError(
            f"{p}: holds a state_dict (weights only); a module is needed: save it with torch.jit.save, "
            "torch.export.save, or torch.save(model) and --trust-pickle"
        )
    if obj is not None and not isinstance(obj, torch.nn.Module):
        raise InputError(f"{p}: holds a {type(obj).__name__}, not a torch.nn.Module")
    if obj is None and not trusted:
        raise InputError(
            f"{p}: is a pickled object; unpickling runs code from the file, so it is refused. "
            "Pass --trust-pickle if you trust its source, or save it with torch.jit.save / torch.export.save"
        )
    if obj is None:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=False)
        except Exception as exc:
            raise InputError(f"{p}: cannot unpickle ({_first_line(exc)})") from None
    if not isinstance(obj, torch.nn.Module):
        raise InputError(f"{p}: holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj.eval()


def _torch_specs(p: Path, module: Any, example: tuple | None, options: IngestOptions) -> tuple[TensorSpec, ...]:
    specs = name_positional(list(options.input_shapes))
    if not specs and example is not None:
        specs = [
            TensorSpec(f"input{i}" if i else "input", tuple(t.shape), str(t.dtype).removeprefix("torch."))
            for i, t in enumerate(example)
        ]
    if not specs:
        raise InputError(f"{p}: a torch model needs its input shapes: pass --input-shape NAME:1x3x224x224")
    specs = [_infer_dtype(module, s, specs) for s in specs]
    _probe(p, module, specs)
    return tuple(with_dynamic(s, options.dynamic[s.name]) if s.name in options.dynamic else s for s in specs)


def _callable(module: Any) -> Any:
    import torch

    return module.module() if isinstance(module, torch.export.ExportedProgram) else module


def _probe(p: Path, module: Any, specs: list[TensorSpec]) -> None:
    """Run the model once on inputs of the given shapes, so a wrong shape is named as such."""
    import torch

    with torch.no_grad(), _quiet():
        try:
            _callable(module)(*_torch_args(tuple(specs)))
        except Exception as exc:
            shapes = ", ".join(f"{s.name}:{'x'.join(map(str, s.shape))}:{s.dtype}" for s in specs)
            raise InputError(f"{p}: the model rejects inputs {shapes}: {_first_line(exc)[:200]}") from None


def _infer_dtype(module: Any, spec: TensorSpec, specs: list[TensorSpec]) -> TensorSpec:
    """Float unless the model rejects floats and takes integers (embedding inputs)."""
    if spec.dtype != "float32" or len(specs) != 1:
        return spec
    import torch

    shape = tuple(d if isinstance(d, int) else 1 for d in spec.shape)
    call = _callable(module)
    with torch.no_grad(), _quiet():
        try:
            call(torch.zeros(shape))
            return spec
        except Exception:
            pass
        try:
            call(torch.zeros(shape, dtype=torch.int64))
            return TensorSpec(spec.name, spec.shape, "int64")
        except Exception:
            return spec


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and graphs to stdout (some from C++) and warnings to
    logging: keep our stdout (JSON) and stderr (one-line errors) clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as sink, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _torch_args(specs: tuple[TensorSpec, ...]) -> tuple:
    import torch

    from dscompile.compiler.samples import concrete_shape

    return tuple(torch.zeros(concrete_shape(s), dtype=getattr(torch, s.dtype)) for s in specs)


def export_to_onnx(module: Any, specs: tuple[TensorSpec, ...], fmt: str, path: Path) -> tuple[onnx.ModelProto, dict[str, str]]:
    """ONNX (opset 18) and the node -> module-path map, taken before simplification."""
    import torch

    args = _torch_args(specs)
    names = [s.name for s in specs]
    dynamic = {s.name: [i for i, d in enumerate(s.shape) if isinstance(d, str)] for s in specs}
    dynamic = {k: v for k, v in dynamic.items() if v}
    errors: list[str] = []
    # TorchScript: convert to an ExportedProgram for the dynamo exporter; the TorchScript
    # exporter loses ranks on loaded traced modules (transformers) and is the fallback.
    attempts = ("ts2ep", "torchscript") if fmt == "torchscript" else ("dynamo", "torchscript")
    for how in attempts:
        try:
            with _quiet():
                model = _export_once(module, args, names, dynamic, how)
            return model, layer_map(model)
        except Exception as exc:
            errors.append(_export_failure(exc))
        if isinstance(module, torch.export.ExportedProgram):
            break
    named = [e for e in errors if e.startswith("the exporter could not handle")]
    raise InputError(f"{path}: export to ONNX failed: {(named or errors)[0]}")


def _export_once(module: Any, args: tuple, names: list[str], dynamic: dict, how: str) -> onnx.ModelProto:
    import torch

    if how == "ts2ep":
        # torch's own TorchScript -> torch.export bridge
        from torch._export.converter import TS2EPConverter

        module, how = TS2EPConverter(module, args).convert(), "dynamo"
        if dynamic:
            raise ValueError("dynamic axes need the TorchScript exporter")
    if how == "dynamo":
        dyn = None
        if dynamic:
            dyn = tuple({a: torch.export.Dim.DYNAMIC for a in dynamic.get(n, [])} or None for n in names)
        prog = torch.onnx.export(
            module, args, dynamo=True, opset_version=OPSET, input_names=names, dynamic_shapes=dyn, optimize=True
        )
        return prog.model_proto
    buf = io.BytesIO()
    torch.onnx.export(
        module, args, buf, dynamo=False, opset_version=OPSET, input_names=names,
        dynamic_axes={n: {a: f"{n}_dim{a}" for a in axes} for n, axes in dynamic.items()} or None,
    )
    return onnx.load_from_string(buf.getvalue())


_OP_IN_MESSAGE = re.compile(r"'?(aten(?:::|\.)[A-Za-z_0-9]+)")


def _export_failure(exc: BaseException) -> str:
    """The first aten op named anywhere in the exception chain, else the first line."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        op = _OP_IN_MESSAGE.search(" ".join(str(e).split()))
        if op:
            why = _first_line(e).split(" This is step")[0]
            return f"the exporter could not handle {op.group(1)} ({why[:200]})"
    return _first_line(exc)


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx-simplifier; a model it cannot handle is kept as it is."""
    if model.ByteSize() > 1_800_000_000 or weights_dir(model) is not None:  # onnxsim works on one message
        return model
    try:
        import onnxsim

        with _quiet():
            simplified, ok = onnxsim.simplify(model)
        return simplified if ok else model
    except Exception:
        return model


def check_export(module: Any, graph: ModelGraph, options: IngestOptions) -> dict[str, Any]:
    """Run torch and onnxruntime on the same inputs; fail past ``export_rtol``."""
    import torch

    from dscompile.compiler.runtime import ort_session, run_session

    feeds = synthetic_feeds(graph.inputs, options.check_samples, options.seed, graph.model)
    sess = ort_session(graph.model)
    call = _callable(module)
    worst = 0.0
    worst_abs = 0.0
    for feed in feeds:
        with torch.no_grad():
            ref = call(*[torch.from_numpy(feed[s.name]) for s in graph.inputs])
        ref_arrays = [t.detach().numpy() for t in flatten_outputs(ref)]
        got = run_session(sess, feed)
        for r, g in zip(ref_arrays, got, strict=False):
            if r.shape != g.shape:
                raise VerificationError(f"export check: output shape {g.shape} differs from torch's {r.shape}")
            abs_err = float(np.max(np.abs(r.astype(np.float64) - g))) if r.size else 0.0
            scale = float(np.max(np.abs(r))) if r.size else 0.0
            worst_abs = max(worst_abs, abs_err)
            worst = max(worst, abs_err / max(scale, 1e-12))
    result = {"samples": len(feeds), "max_rel_err": worst, "max_abs_err": worst_abs, "rtol": options.export_rtol}
    if worst > options.export_rtol:
        raise VerificationError(
            f"{graph.source.path}: the ONNX export disagrees with torch: max relative error {worst:.3g} "
            f"> tolerance {options.export_rtol:g} (max abs error {worst_abs:.3g})"
        )
    return result


def flatten_outputs(out: Any) -> list:
    """A torch model's outputs (nested tuples, lists, dicts) as a flat list of tensors."""
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in flatten_outputs(o)]
    return [out]
