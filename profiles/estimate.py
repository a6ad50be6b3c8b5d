"""Roofline estimates of latency from a device profile, per layer and per model.

A layer at a precision takes ``max(compute, memory) + overhead`` where

    compute = 2 * MACs / (peak rate of that precision * compute efficiency)
    memory  = (weight bytes + activation bytes) / (bandwidth * memory efficiency)

Peak rates and bandwidth come from the device profile (``devices/*.toml``);
the efficiency factors and overheads are per device class, fitted on published
measurements (``published/*.toml``) by ``dscompile.profiles.fit`` and kept in
``efficiency.toml`` with the fit's sources and its error on held-out models.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import tomllib
from dscompile.compiler.capabilities import (
    FP16,
    FP32,
    INT4_WEIGHT,
    INT8,
    INT8_DYNAMIC,
    INT8_WEIGHT,
    INT16X8,
    WEIGHT_BITS,
    Cost,
    Layer,
)
from dscompile.profiles.devices import DeviceProfile

from dscompile.errors import InputError

EFFICIENCY_FILE = Path(__file__).parent / "efficiency.toml"

# Which peak-rate figure the arithmetic of a precision runs at. Weight-only
# precisions compute at the class's ``weight_only_compute`` precision.
PEAK_KEY = {FP32: "peak_fp32_tflops", FP16: "peak_fp16_tflops", INT8: "peak_int8_tops",
            INT8_DYNAMIC: "peak_int8_tops", INT16X8: "peak_int8_tops"}
# Bytes an activation element takes in memory at each precision.
ACTIVATION_BYTES = {FP32: 4, FP16: 2, INT8: 1, INT8_DYNAMIC: 4, INT16X8: 2}
WEIGHT_ONLY = (INT8_WEIGHT, INT4_WEIGHT)


@dataclass(frozen=True)
class Efficiency:
    """Fitted factors for one device class."""

    device_class: str
    compute: Mapping[str, float]  # precision -> fraction of the peak rate reached
    memory: float  # fraction of the peak bandwidth reached
    layer_overhead_us: float  # fixed cost per fused layer (kernel launch, sync)
    model_overhead_us: float  # fixed cost per inference
    weight_only_compute: str  # precision the arithmetic of weight-only layers runs at
    rate_scale: Mapping[str, float]  # precision -> fraction of its PEAK_KEY rate (int16x8: 0.5)
    source: str
    file: str

    def compute_for(self, precision: str) -> float:
        if precision in self.compute:
            return self.compute[precision]
        base = INT8 if precision == INT8_DYNAMIC else precision
        if base not in self.compute:
            raise InputError(f"{self.file}: class {self.device_class!r} has no compute efficiency for {precision!r}")
        return self.compute[base]


@functools.cache
def load_efficiency(path: Path = EFFICIENCY_FILE) -> dict[str, Efficiency]:
    """Efficiency factors by device class; a missing or non-numeric factor names file and key."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: efficiency factors not found (run python -m dscompile.profiles.fit)") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None
    out: dict[str, Efficiency] = {}
    for cls, table in data.get("classes", {}).items():
        where = f"{path}: classes.{cls}"

        def num(key: str, tbl: Mapping = table, where: str = where) -> float:
            v = tbl.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InputError(f"{where}.{key} is missing or not a number ({v!r})")
            return float(v)

        if not str(table.get("source", "")).strip():
            raise InputError(f"{where} has no source")
        compute = {p: num(p, table.get("compute", {}), f"{where}.compute") for p in table.get("compute", {})}
        scale = {p: num(p, table.get("rate_scale", {}), f"{where}.rate_scale") for p in table.get("rate_scale", {})}
        out[cls] = Efficiency(
            cls, compute, num("memory"), num("layer_overhead_us"), num("model_overhead_us"),
            str(table.get("weight_only_compute", FP16)), scale, str(table["source"]), str(path),
        )
    return out


def efficiency_for(profile: DeviceProfile) -> Efficiency:
    table = load_efficiency()
    if profile.device_class not in table:
        raise InputError(
            f"{profile.file}: no efficiency factors for device class {profile.device_class!r} "
            f"(classes with factors: {', '.join(table) or 'none'})"
        )
    return table[profile.device_class]


def compute_precision(precision: str, eff: Efficiency) -> str:
    return eff.weight_only_compute if precision in WEIGHT_ONLY else precision


def weight_bytes(layer: Layer, precision: str) -> int:
    if precision not in WEIGHT_BITS:
        raise InputError(f"unknown precision {precision!r} (known: {', '.join(WEIGHT_BITS)})")
    return layer.params * WEIGHT_BITS[precision] // 8


def layer_seconds(profile: DeviceProfile, eff: Efficiency, layer: Layer, precision: str, batch: int = 1) -> float:
    """Seconds one layer takes on ``profile`` at ``precision`` for ``batch`` samples."""
    cp = compute_precision(precision, eff)
    rate = profile.value(PEAK_KEY[cp]) * 1e12 * eff.rate_scale.get(cp, 1.0) * eff.compute_for(cp)
    compute = 2.0 * layer.macs * batch / rate if layer.macs else 0.0
    traffic = weight_bytes(layer, precision) + layer.activation_elems * ACTIVATION_BYTES[cp] * batch
    memory = traffic / (profile.value("mem_bandwidth_gbps") * 1e9 * eff.memory)
    return max(compute, memory) + eff.layer_overhead_us * 1e-6


def source_of(profile: DeviceProfile, eff: Efficiency) -> str:
    return f"roofline from {profile.file_name}, efficiency {eff.device_class} ({Path(eff.file).name})"


def layer_cost(profile: DeviceProfile, layer: Layer, precision: str) -> Cost:
    """Estimated cost of one layer at batch 1: weight bytes and latency, sourced to the TOML."""
    eff = efficiency_for(profile)
    seconds = layer_seconds(profile, eff, layer, precision)
    return Cost(weight_bytes(layer, precision), seconds * 1e3, "estimated", source_of(profile, eff))


def model_estimate(
    profile: DeviceProfile, layers: Sequence[Layer], precisions: Mapping[str, str],
    batch: int = 1, default: str = FP32,
) -> tuple[float, float]:
    """(latency_ms, fps) of a whole model: its layers in sequence plus the per-inference overhead.

    ``precisions`` maps layer names to precisions; layers not named run at ``default``.
    """
    if batch < 1:
        raise InputError(f"batch must be at least 1 (got {batch})")
    eff = efficiency_for(profile)
    seconds = eff.model_overhead_us * 1e-6
    seconds += sum(layer_seconds(profile, eff, lay, precisions.get(lay.name, default), batch) for lay in layers)
    latency_ms = seconds * 1e3
    return latency_ms, batch * 1e3 / latency_ms
