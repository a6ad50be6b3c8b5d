"""The verified map between ONNX tensors and TFLite tensors, and the I/O bindings.

TFLite tensor names are TensorFlow op paths, not ONNX names, and onnx2tf
moves image tensors to channels-last, fuses activations into convolutions and
decomposes some ops. So names cannot be matched; values can. Both models run
on the same probe inputs (onnxruntime exposing every intermediate, LiteRT
preserving every tensor) and a TFLite tensor is paired with an ONNX tensor
when their values agree up to a permutation of elements (layout changes only
reorder them). Every pair in the map has been checked that way: it is a
verified map, not a guess from names.

The same run checks the conversion itself: the model outputs must agree, and
when they do not, the first ONNX tensor whose value no TFLite tensor carries
(and after which nothing matches any more) is named.
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from dscompile.compiler.graph import static_shapes
from dscompile.compiler.runtime import ort_session
from dscompile.errors import VerificationError
from dscompile.profiles.litert_runner import IoBinding, IoMap
from dscompile.targets.tflite_flatbuffer import TflGraph, read_graph

Feed = dict[str, np.ndarray]
_RTOL = 1e-3  # float32 kernels of two runtimes, a few dozen layers deep


@dataclass(frozen=True)
class TensorMap:
    io: IoMap
    onnx_to_tflite: dict[str, str]  # ONNX tensor -> the TFLite tensor holding the same values
    tflite_to_onnx: dict[str, tuple[str, ...]]  # TFLite tensor -> every ONNX tensor it equals
    unmapped_tflite: tuple[str, ...]  # float activations with no ONNX twin (decompositions)
    probes: int
    output_max_abs_err: float
    notes: dict[str, object] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {
            "verified_on": f"{self.probes} probe inputs, values compared within rtol {_RTOL}",
            "onnx_tensors_mapped": len(self.onnx_to_tflite),
            "tflite_tensors_mapped": len(self.tflite_to_onnx),
            "tflite_tensors_without_onnx_twin": len(self.unmapped_tflite),
            "float_output_max_abs_err": float(f"{self.output_max_abs_err:.6g}"),
            "io": self.io.to_json(),
        }


def all_intermediates(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose outputs are every float tensor any node produces."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    shapes = static_shapes(model)
    inferred = {}
    try:
        g = onnx.shape_inference.infer_shapes(model).graph
        inferred = {v.name: v for v in list(g.value_info) + list(g.output) + list(g.input)}
    except Exception:  # inference is advisory; untyped outputs still run in onnxruntime
        pass
    present = {o.name for o in out.graph.output}
    names = []
    for node in model.graph.node:
        for t in node.output:
            vi = inferred.get(t)
            if not t or vi is None or vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
                continue
            names.append(t)
            if t not in present:
                out.graph.output.append(vi if t in shapes else onnx.helper.make_empty_tensor_value_info(t))
    return out, names


def run_onnx_all(model: onnx.ModelProto, feeds: Sequence[Feed]) -> dict[str, list[np.ndarray]]:
    full, names = all_intermediates(model)
    sess = ort_session(full, optimize=False)
    wanted = [o.name for o in sess.get_outputs()]
    inputs = {i.name for i in sess.get_inputs()}
    values: dict[str, list[np.ndarray]] = {}
    for feed in feeds:
        got = sess.run(wanted, {k: v for k, v in feed.items() if k in inputs})
        for name, arr in zip(wanted, got, strict=True):
            if isinstance(arr, np.ndarray) and arr.dtype == np.float32:
                values.setdefault(name, []).append(arr)
    for spec in model.graph.input:
        for feed in feeds:
            if spec.name in feed and feed[spec.name].dtype == np.float32:
                values.setdefault(spec.name, []).append(feed[spec.name])
    return values


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _pair_names(onnx_names: Sequence[str], sig_names: Sequence[str]) -> dict[str, str]:
    by_clean = {_sanitize(s): s for s in sig_names}
    pairs = {o: (o if o in sig_names else by_clean.get(_sanitize(o), "")) for o in onnx_names}
    if all(pairs.values()) and len(set(pairs.values())) == len(pairs):
        return pairs
    if len(onnx_names) == len(sig_names):
        return dict(zip(onnx_names, sig_names, strict=True))
    return {}


def _perms(src: tuple[int, ...], dst: tuple[int, ...], prefer: tuple[int, ...] | None) -> list[tuple[int, ...]]:
    """Axis permutations p with src[p] == dst, ``prefer`` (then identity) first."""
    if len(src) != len(dst):
        return []
    found = [p for p in itertools.permutations(range(len(src))) if tuple(src[i] for i in p) == tuple(dst)]
    ident = tuple(range(len(src)))
    order = [x for x in (prefer, ident) if x in found]
    return order + [p for p in found if p not in order]


def channels_last_perm(rank: int) -> tuple[int, ...]:
    return (0, *range(2, rank), 1)


class PreservedRun:
    """The float TFLite run with every intermediate tensor preserved."""

    def __init__(self, tflite: bytes) -> None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        # Builtin kernels without XNNPACK: the delegate would hide its intermediates.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "preserve_all_tensors is for debugging": that is the point here
            self.it = Interpreter(
                model_content=tflite, experimental_preserve_all_tensors=True,
                experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            )
        self.key = next(iter(self.it.get_signature_list()))
        self.sig = self.it.get_signature_list()[self.key]
        self.runner = self.it.get_signature_runner(self.key)
        self.in_details = self.runner.get_input_details()

    def run(self, args: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cast = {k: v.astype(self.in_details[k]["dtype"], copy=False) for k, v in args.items()}
        return self.runner(**cast)

    def tensor(self, index: int) -> np.ndarray | None:
        try:
            return self.it.get_tensor(index)
        except ValueError:  # tensors without data (optional inputs)
            return None


def bind_io(
    model: onnx.ModelProto, lite: PreservedRun, feeds: Sequence[Feed], channels_last: Sequence[str],
) -> tuple[IoMap, list[dict[str, np.ndarray]], float]:
    """Input/output bindings that make the float TFLite reproduce the ONNX outputs."""
    sess = ort_session(model, optimize=False)
    onnx_in = [i.name for i in sess.get_inputs()]
    onnx_out = [o.name for o in sess.get_outputs()]
    in_names = _pair_names(onnx_in, lite.sig["inputs"])
    out_names = _pair_names(onnx_out, lite.sig["outputs"])
    if not in_names or not out_names:
        raise VerificationError(
            f"cannot pair the TFLite signature ({lite.sig}) with the ONNX inputs {onnx_in} and outputs {onnx_out}"
        )
    refs = [sess.run(None, {k: f[k] for k in onnx_in}) for f in feeds]
    choices = []
    for name in onnx_in:
        shape = tuple(feeds[0][name].shape)
        tshape = tuple(int(d) for d in lite.in_details[in_names[name]]["shape"])
        prefer = channels_last_perm(len(shape)) if name in channels_last else None
        choices.append(_perms(shape, tshape, prefer) or [tuple(range(len(shape)))])
    worst, first = np.inf, None
    for combo in itertools.islice(itertools.product(*choices), 16):
        inputs = tuple(IoBinding(n, in_names[n], p, str(feeds[0][n].dtype)) for n, p in zip(onnx_in, combo, strict=True))
        first = first or inputs
        outs = [lite.run({b.tflite: b.to_tflite(f[b.onnx]) for b in inputs}) for f in feeds]
        bound, err = _bind_outputs(onnx_out, out_names, refs, outs)
        if bound is not None:
            return IoMap(lite.key, inputs, bound), outs, err
        worst = min(worst, err)
    # No output agrees: keep the preferred input layout so the caller can find where values diverge.
    return IoMap(lite.key, first or (), ()), [], worst


def _bind_outputs(onnx_out, out_names, refs, outs) -> tuple[tuple[IoBinding, ...] | None, float]:
    bound, worst = [], 0.0
    for j, name in enumerate(onnx_out):
        ref0, got0 = refs[0][j], outs[0][out_names[name]]
        for p in _perms(tuple(ref0.shape), tuple(got0.shape), None):
            errs = [_max_err(r[j], o[out_names[name]].transpose(np.argsort(p))) for r, o in zip(refs, outs, strict=True)]
            if max(errs) <= _tolerance(ref0):
                bound.append(IoBinding(name, out_names[name], p, str(ref0.dtype)))
                worst = max(worst, max(errs))
                break
        else:
            return None, np.inf
    return tuple(bound), worst


def _max_err(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return np.inf
    if not np.issubdtype(a.dtype, np.floating):
        return 0.0 if np.array_equal(a, b) else np.inf
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def _tolerance(ref: np.ndarray) -> float:
    scale = float(np.max(np.abs(ref))) if ref.size and np.issubdtype(ref.dtype, np.floating) else 1.0
    return _RTOL * max(scale, 1e-3)


def _fingerprint(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Sorted values per probe, concatenated: equal for two layouts of the same tensor."""
    return np.concatenate([np.sort(a.astype(np.float32).ravel()) for a in arrays])


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    scale = max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-3)
    return a.shape == b.shape and float(np.max(np.abs(a - b))) <= _RTOL * scale if a.size else a.shape == b.shape


def build_map(
    model: onnx.ModelProto, tflite: bytes, feeds: Sequence[Feed], channels_last: Sequence[str] = (),
) -> TensorMap:
    """Bind I/O, check the float outputs, and pair every float activation by value.

    Raises VerificationError naming the first diverging ONNX tensor when the
    TFLite outputs disagree with onnxruntime's.
    """
    lite = PreservedRun(tflite)
    io, _, err = bind_io(model, lite, feeds, channels_last)
    onnx_values = run_onnx_all(model, feeds)
    graph = read_graph(tflite)
    tfl_values = _tflite_values(lite, graph, io, feeds)
    onnx_to_tfl, tfl_to_onnx = _match(onnx_values, tfl_values, graph)
    if not io.outputs:
        first = first_diverging(model, set(onnx_to_tfl))
        raise VerificationError(
            f"the converted TFLite model disagrees with its ONNX source; first diverging tensor: {first}"
        )
    unmapped = tuple(graph.tensors[i].name for i in tfl_values if graph.tensors[i].name not in tfl_to_onnx)
    return TensorMap(io, onnx_to_tfl, tfl_to_onnx, unmapped, len(feeds), err)


def _tflite_values(lite: PreservedRun, graph: TflGraph, io: IoMap, feeds: Sequence[Feed]) -> dict[int, list[np.ndarray]]:
    wanted = [t.index for t in graph.tensors if t.dtype == "float32" and not t.constant]
    values: dict[int, list[np.ndarray]] = {i: [] for i in wanted}
    for feed in feeds:
        if io.inputs:
            lite.run({b.tflite: b.to_tflite(feed[b.onnx]) for b in io.inputs})
        for i in wanted:
            v = lite.tensor(i)
            if v is not None:
                values[i].append(np.array(v))
    return {i: v for i, v in values.items() if len(v) == len(feeds)}


def _match(
    onnx_values: dict[str, list[np.ndarray]], tfl_values: dict[int, list[np.ndarray]], graph: TflGraph,
) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    by_size: dict[int, list[tuple[str, np.ndarray]]] = {}
    for name, arrays in onnx_values.items():
        by_size.setdefault(sum(a.size for a in arrays), []).append((name, _fingerprint(arrays)))
    onnx_to_tfl: dict[str, tuple[str, float]] = {}
    tfl_to_onnx: dict[str, tuple[str, ...]] = {}
    for index, arrays in tfl_values.items():
        fp = _fingerprint(arrays)
        tname = graph.tensors[index].name
        hits = []
        for oname, ofp in by_size.get(fp.size, []):
            if _same(ofp, fp):
                hits.append(oname)
                err = float(np.max(np.abs(ofp - fp))) if fp.size else 0.0
                if oname not in onnx_to_tfl or err < onnx_to_tfl[oname][1]:
                    onnx_to_tfl[oname] = (tname, err)
        if hits:
            tfl_to_onnx[tname] = tuple(hits)
    return {k: v[0] for k, v in onnx_to_tfl.items()}, tfl_to_onnx


def first_diverging(model: onnx.ModelProto, matched: set[str]) -> str:
    """The first ONNX tensor (in graph order) after which no tensor is matched any more."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    live: dict[str, bool] = {}  # tensor -> it or something downstream is matched
    for n in reversed(model.graph.node):
        for t in n.output:
            live[t] = t in matched or any(live.get(o, False) for c in consumers.get(t, []) for o in c.output)
    floats = {v.name for v in onnx.shape_inference.infer_shapes(model).graph.value_info
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT} | {o.name for o in model.graph.output}
    const = {t.name for t in model.graph.initializer}
    for n in model.graph.node:  # constants (folded away by the converter) cannot diverge
        if n.op_type == "Constant" or all(i in const for i in n.input if i):
            const.update(n.output)
    for n in model.graph.node:
        for t in n.output:
            if t in floats and t not in const and not live.get(t, False):
                return f"{t!r} (output of ONNX node {n.name!r}, {n.op_type})"
    out = model.graph.output[0].name if model.graph.output else "?"
    return f"{out!r} (a model output)"
