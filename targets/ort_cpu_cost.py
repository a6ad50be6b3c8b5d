"""ort-cpu cost model: weight bytes per layer and precision, plus latency.

Latency on this machine is *measured*: for each precision, the model with every
layer that can take it lowered to it runs under onnxruntime's profiler, and
each kernel's time is attributed to the layer that owns the node (fused nodes
keep their anchor's name; Q/DQ nodes are named after the tensor they quantise
and charged to the layer reading it). For another CPU (``--device``) latency is
*estimated* from its profile: max(2 x MACs / peak ops at the precision, weight
bytes / memory bandwidth), from the figures peak_fp32_tflops, peak_int8_tops and
mem_bandwidth_gbps of profiles/devices/<device>.toml.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from dscompile.compiler import qdq
from dscompile.compiler.capabilities import (
    FP16,
    FP32,
    INT4_WEIGHT,
    INT8,
    INT8_DYNAMIC,
    INT8_WEIGHT,
    WEIGHT_BITS,
    Cost,
    Layer,
)
from dscompile.compiler.graph import graph_inputs
from dscompile.compiler.onnx_io import new_session
from dscompile.compiler.samples import synthetic_feeds

log = logging.getLogger("dscompile")
PROFILE_RUNS = 30
WARMUP_RUNS = 3
# Figures an estimate reads from a CPU's device profile (profiles/devices/*.toml).
# (figure, multiplier to ops/s or bytes/s); weight-only and fp16-stored layers compute in fp32 on a CPU.
PEAK_FIGURE = {FP32: ("peak_fp32_tflops", 1e12), FP16: ("peak_fp32_tflops", 1e12), INT8: ("peak_int8_tops", 1e12),
               INT8_DYNAMIC: ("peak_int8_tops", 1e12), INT4_WEIGHT: ("peak_fp32_tflops", 1e12)}
BANDWIDTH_FIGURE = ("mem_bandwidth_gbps", 1e9)
# Protobuf bytes a lowered layer adds besides its data (2-3 more initializers' names, dims and types, a
# replacement node): all-MiniLM-L6-v2 with 37 layers at int4 had 45,556 bytes of structure against
# 40,067 at fp32, ~150 per layer. Counted so that `--budget size=F` holds for the file, not only its data.
LOWERED_STRUCTURE_BYTES = 160


def structure_bytes(model: onnx.ModelProto) -> int:
    """The model file's bytes that are no weight data (graph, names, metadata)."""
    data = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        data += len(t.raw_data) if t.raw_data else n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return max(model.ByteSize() - data, 0)


def weight_bytes(layer: Layer, precision: str, sizes: dict[str, int], channels: int, block: int = 32) -> int:
    """Bytes of the layer's main weight at ``precision`` with its scales, plus its other tensors at fp32
    (and ``LOWERED_STRUCTURE_BYTES`` for a lowered weight's extra tensors)."""
    if not layer.weights:
        return 0
    if precision != FP32:
        return _data_bytes(layer, precision, sizes, channels, block) + LOWERED_STRUCTURE_BYTES
    return _data_bytes(layer, precision, sizes, channels, block)


def _data_bytes(layer: Layer, precision: str, sizes: dict[str, int], channels: int, block: int) -> int:
    main = sizes.get(layer.weights[0], 0)
    rest = sum(sizes.get(w, 0) for w in layer.weights[1:]) * 4
    if layer.op == "Gather" and precision in (INT8_WEIGHT, INT4_WEIGHT):  # GatherBlockQuantized: fp16 scales, no zero points
        return main * WEIGHT_BITS[precision] // 8 + -(-main // block) * 2 + rest
    if precision in (INT8, INT8_DYNAMIC):
        return main + 4 * channels + rest
    if precision == INT4_WEIGHT:
        blocks = -(-main // block)
        return (main + 1) // 2 + blocks * 4 + (blocks + 1) // 2 + rest
    return main * WEIGHT_BITS.get(precision, 32) // 8 + rest


class OrtCpuCost:
    """Cost of a layer at a precision: bytes always; latency measured here or estimated from a profile."""

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], menus: dict[str, tuple[str, ...]],
                 lower, device: str, profile=None, threads: int | None = None, inputs=None) -> None:
        self.model, self.layers, self.menus, self.lower = model, layers, menus, lower
        self.device, self.profile, self.threads = device, profile, threads
        self.inputs = inputs or graph_inputs(model)  # the user's shapes where the model's are dynamic
        self.sizes = {t.name: int(np.prod(t.dims)) if t.dims else 1 for t in model.graph.initializer}
        self.dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
        self.nodes = {n.name: n for n in model.graph.node}
        self._latency: dict[str, dict[str, float]] | None = None
        self._overhead = 0.0
        self.source = ""
        self.structure = structure_bytes(model)

    def overhead_bytes(self) -> int:
        """The file's structure (graph, names): part of FP32's size and of every plan's."""
        return self.structure

    def cost(self, layer: Layer, precision: str) -> Cost:
        nbytes = weight_bytes(layer, precision, self.sizes, self._channels(layer))
        if self.profile is not None:  # the roofline reads the weight data only: the graph's structure is not streamed per run
            data = _data_bytes(layer, precision, self.sizes, self._channels(layer), 32) if layer.weights else 0
            return Cost(nbytes, self._estimate(layer, precision, data), "estimated", self.source_text())
        lat = self.measured().get(precision, {}).get(layer.name)
        if lat is None:
            lat = self.measured().get(FP32, {}).get(layer.name, 0.0)
        return Cost(nbytes, round(lat, 5), "measured", self.source_text())

    def _channels(self, layer: Layer) -> int:
        dims = self.dims.get(layer.weights[0], ()) if layer.weights else ()
        node = self.nodes.get(layer.nodes[0])
        if not dims or node is None:
            return 1
        return int(dims[qdq.channel_axis(node, len(dims)) % len(dims)])

    def source_text(self) -> str:
        if self.profile is not None:
            return (f"roofline from {Path(self.profile.file).name} ({self.profile.name}: theoretical peaks "
                    f"{', '.join(sorted({k for k, _ in PEAK_FIGURE.values()}))}, {BANDWIDTH_FIGURE[0]})")
        from dscompile.compiler.runtime import ort_version
        from dscompile.profiles.host import host_label

        return f"onnxruntime {ort_version()} profiler on {host_label()}"

    def _estimate(self, layer: Layer, precision: str, nbytes: int) -> float:
        key, unit = PEAK_FIGURE.get(precision, PEAK_FIGURE[FP32])
        peak = self.profile.value(key) * unit
        bw = self.profile.value(BANDWIDTH_FIGURE[0]) * BANDWIDTH_FIGURE[1]
        return float(f"{max(2.0 * layer.macs / peak, nbytes / bw) * 1e3:.6g}")

    def overhead_ms(self) -> float:
        """Measured time of the nodes no layer owns (fp32 everywhere); 0 for estimates."""
        if self.profile is not None:
            return 0.0
        self.measured()
        return self._overhead

    def measured(self) -> dict[str, dict[str, float]]:
        if self._latency is None:
            self._latency = self._profile_all()
        return self._latency

    def _profile_all(self) -> dict[str, dict[str, float]]:
        precisions = sorted({p for ps in self.menus.values() for p in ps} - {FP16})
        feed = synthetic_feeds(self.inputs, 1, 0, self.model)[0]
        owners = self._owners()
        out: dict[str, dict[str, float]] = {}
        for p in precisions:
            assign = {lay.name: p for lay in self.layers if p in self.menus.get(lay.name, ())}
            try:
                times = _profile(self.lower(assign), feed, self.threads)
                out[p] = _attribute(times, owners)
                if p == FP32:
                    self._overhead = max(0.0, sum(times.values()) - sum(out[p].values()))
            except Exception as exc:  # a precision that fails to build here is simply not measured
                log.warning("cost: could not profile %s on this machine (%s); its latency counts as fp32's",
                            p, " ".join(str(exc).split())[:160])
        return out

    def _owners(self) -> dict[str, str]:
        """Node or tensor name -> layer that pays for it."""
        owners: dict[str, str] = {}
        for lay in self.layers:
            for n in lay.nodes:
                owners[n] = lay.name
            for t in (*lay.inputs, *lay.outputs, *lay.weights):
                owners.setdefault(t, lay.name)
        return owners


def _profile(model: onnx.ModelProto, feed: dict, threads: int | None) -> dict[str, float]:
    """Median kernel time (ms) per optimised node name over PROFILE_RUNS runs (after WARMUP_RUNS)."""

    from dscompile.compiler.runtime import session_options

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(threads)
        so.enable_profiling = True
        so.log_severity_level = 4  # a precision that fails to run is logged by us, not printed by onnxruntime
        so.profile_file_prefix = os.path.join(tmp, "profile")
        sess = new_session(model, so)
        names = {i.name for i in sess.get_inputs()}
        f = {k: v for k, v in feed.items() if k in names}
        for _ in range(WARMUP_RUNS + PROFILE_RUNS):
            sess.run(None, f)
        events = json.loads(Path(sess.end_profiling()).read_text())
    return node_times(events, WARMUP_RUNS)


def node_times(events: list[dict], warmup: int) -> dict[str, float]:
    """Per node, the median over runs of its kernel time (ms), the first ``warmup`` runs left out.

    The median, not the mean: on a shared machine one preempted run puts a spike of milliseconds on
    whichever node it hit, and a mean made identical layers differ by 3-20x (all-MiniLM-L6-v2's 24
    same-shape projections measured 0.058-0.19 ms at fp32 and up to 1.2 ms at int4 under load).
    Runs are told apart by onnxruntime's ``model_run`` events; a node that runs several times in
    one (inside a loop) has those times summed.
    """
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    per_run: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        run = max(bisect.bisect_right(starts, e.get("ts", 0)) - 1, 0)
        runs = per_run.setdefault(e["name"][: -len("_kernel_time")], [0.0] * max(len(starts), 1))
        runs[run] += e.get("dur", 0) / 1e3
    return {name: float(np.median(runs[warmup:] or runs)) for name, runs in per_run.items()}


def _attribute(times: dict[str, float], owners: dict[str, str]) -> dict[str, float]:
    """Per-layer ms from per-node ms; names onnxruntime rewrote are matched by known prefixes."""
    per_layer: dict[str, float] = {}
    known = sorted(owners, key=len, reverse=True)
    for name, ms in times.items():
        layer = _owner(name, owners, known)
        if layer is not None:
            per_layer[layer] = per_layer.get(layer, 0.0) + ms
    return per_layer


def _owner(name: str, owners: dict[str, str], known: list[str]) -> str | None:
    clean = name.removeprefix("fused ")
    if clean in owners:
        return owners[clean]
    for suffix in ("_QuantizeLinear", "_DequantizeLinear", "_nchwc"):
        base = clean.split(suffix)[0]
        if base != clean and base in owners:
            return owners[base]
    for k in known:  # "<node>_token_3", "<node>/MatMulScaleFusion/", "<gemm>_6"
        if clean.startswith(k) and len(clean) > len(k) and clean[len(k)] in "_/ ":
            return owners[k]
    return None
