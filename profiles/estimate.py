"""Roofline estimates of latency from a device profile, per layer and per model.

A layer at a precision takes ``max(compute, memory) + overhead`` where

    compute  = 2 * MACs / (peak rate of that precision * compute efficiency [* depthwise rate])
    memory   = (weight bytes + f * activation bytes) / (bandwidth * memory efficiency)
    overhead = per-layer launch cost, scaled by reference clock / accelerator clock

``f`` is the fraction of activation traffic that reaches DRAM (the rest stays
in on-chip SRAM / L2); the clock scaling applies where the profile has an
``accel_clock_mhz`` figure (kernel launch and synchronisation are clock-bound).

Peak rates and bandwidth come from the device profile (``devices/*.toml``);
the efficiency factors and overheads are per device class, fitted on published
measurements (``published/*.toml``) by ``dscompile.profiles.fit`` and kept in
``efficiency.toml`` with the fit's sources and its error on held-out models.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
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
from dscompile.errors import InputError
from dscompile.profiles.devices import DeviceProfile

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
    layer_overhead_us: float  # fixed cost per fused layer (kernel launch, sync) at reference_clock_mhz
    model_overhead_us: float  # fixed cost per inference
    weight_only_compute: str  # precision the arithmetic of weight-only layers runs at
    rate_scale: Mapping[str, float]  # precision -> fraction of its PEAK_KEY rate (int16x8: 0.5)
    source: str
    file: str
    activation_dram: float = 1.0  # fraction of activation traffic that goes to DRAM
    depthwise_rate: float = 1.0  # depthwise layers reach this fraction of the precision's compute efficiency
    reference_clock_mhz: float = 0.0  # clock the layer overhead was fitted at (0: do not scale)

    overhead_scale: Mapping[str, float] = field(default_factory=dict)  # precision -> layer overhead multiplier
    unfused_ops: frozenset[str] = frozenset()  # element-wise ops the class's runtime runs as layers of their own
    fitted: tuple[str, ...] = ()  # precisions whose compute factor was fitted on published figures

    def overhead_s(self, profile: DeviceProfile, precision: str) -> float:
        scale = self.overhead_scale.get(precision, 1.0)
        if self.reference_clock_mhz and "accel_clock_mhz" in profile.figures:
            scale *= self.reference_clock_mhz / profile.value("accel_clock_mhz")
        return self.layer_overhead_us * 1e-6 * scale

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

        def opt(key: str, default: float, tbl: Mapping = table) -> float:
            return num(key, tbl) if key in tbl else default

        if not str(table.get("source", "")).strip():
            raise InputError(f"{where} has no source")
        compute = {p: num(p, table.get("compute", {}), f"{where}.compute") for p in table.get("compute", {})}
        scale = {p: num(p, table.get("rate_scale", {}), f"{where}.rate_scale") for p in table.get("rate_scale", {})}
        oscale = {p: num(p, table.get("overhead_scale", {}), f"{where}.overhead_scale") for p in table.get("overhead_scale", {})}
        out[cls] = Efficiency(
            cls, compute, num("memory"), num("layer_overhead_us"), num("model_overhead_us"),
            str(table.get("weight_only_compute", FP16)), scale, str(table["source"]), str(path),
            activation_dram=opt("activation_dram", 1.0), depthwise_rate=opt("depthwise_rate", 1.0),
            reference_clock_mhz=opt("reference_clock_mhz", 0.0), overhead_scale=oscale,
            unfused_ops=frozenset(str(o) for o in table.get("unfused_ops", ())),
            fitted=tuple(str(p) for p in table.get("fitted", ())),
        )
    return out


@dataclass(frozen=True)
class DeviceScale:
    """One device's correction of its class's factors, fitted on that device's own published figures.

    ``compute`` multiplies every compute efficiency (it absorbs an error in the profile's peak
    rates, which for Snapdragon NPUs are not published); ``overhead`` multiplies the per-layer
    and per-inference overheads (a newer runtime or faster clocks launch faster).
    """

    device: str
    compute: float
    overhead: float
    source: str


@functools.cache
def load_device_scales(path: Path = EFFICIENCY_FILE) -> dict[str, DeviceScale]:
    """The ``[devices.ID]`` tables of efficiency.toml; a non-numeric factor names file and key."""
    try:
        data = tomllib.loads(path.read_text())
    except (FileNotFoundError, tomllib.TOMLDecodeError):
        return {}  # load_efficiency reports the file's problem
    out: dict[str, DeviceScale] = {}
    for dev, table in data.get("devices", {}).items():
        vals = {}
        for key in ("compute", "overhead"):
            v = table.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise InputError(f"{path}: devices.{dev}.{key} is missing or not a positive number ({v!r})")
            vals[key] = float(v)
        if not str(table.get("source", "")).strip():
            raise InputError(f"{path}: devices.{dev} has no source")
        out[dev] = DeviceScale(dev, vals["compute"], vals["overhead"], str(table["source"]))
    return out


def scaled(eff: Efficiency, scale: DeviceScale) -> Efficiency:
    """The class factors with one device's correction applied (the source says so)."""
    return replace(
        eff, compute={k: v * scale.compute for k, v in eff.compute.items()},
        layer_overhead_us=eff.layer_overhead_us * scale.overhead, model_overhead_us=eff.model_overhead_us * scale.overhead,
        source=f"{eff.source}; {scale.device}: compute x{scale.compute:.3g}, overheads x{scale.overhead:.3g} ({scale.source})",
    )


def efficiency_for(profile: DeviceProfile, device_scale: bool = True) -> Efficiency:
    """The class's fitted factors, corrected for this device when efficiency.toml has a fit for it."""
    table = load_efficiency()
    if profile.device_class not in table:
        raise InputError(
            f"{profile.file}: no efficiency factors for device class {profile.device_class!r} "
            f"(classes with factors: {', '.join(table) or 'none'})"
        )
    eff = table[profile.device_class]
    scale = load_device_scales().get(profile.id) if device_scale else None
    return scaled(eff, scale) if scale else eff


def compute_precision(precision: str, eff: Efficiency) -> str:
    return eff.weight_only_compute if precision in WEIGHT_ONLY else precision


def weight_bytes(layer: Layer, precision: str) -> int:
    if precision not in WEIGHT_BITS:
        raise InputError(f"unknown precision {precision!r} (known: {', '.join(WEIGHT_BITS)})")
    return layer.params * WEIGHT_BITS[precision] // 8


def layer_seconds(profile: DeviceProfile, eff: Efficiency, layer: Layer, precision: str, batch: int = 1) -> float:
    """Seconds one layer takes on ``profile`` at ``precision`` for ``batch`` samples."""
    cp = compute_precision(precision, eff)
    key = PEAK_KEY[cp]
    if key == "peak_fp16_tflops" and key not in profile.figures:
        key = "peak_fp32_tflops"  # a CPU without fp16 arithmetic (allowed by the profile schema)
    rate = profile.value(key) * 1e12 * eff.rate_scale.get(cp, 1.0) * eff.compute_for(cp)
    if layer.depthwise:
        rate *= eff.depthwise_rate
    compute = 2.0 * layer.macs * batch / rate if layer.macs else 0.0
    traffic = weight_bytes(layer, precision) + eff.activation_dram * layer.activation_elems * ACTIVATION_BYTES[cp] * batch
    memory = traffic / (profile.value("mem_bandwidth_gbps") * 1e9 * eff.memory)
    return max(compute, memory) + eff.overhead_s(profile, cp)


def source_of(profile: DeviceProfile, eff: Efficiency, precision: str | None = None) -> str:
    if not eff.source.startswith("fitted"):
        fitted = "NOT fitted: prior guess"
    elif precision is not None and compute_precision(precision, eff) not in eff.fitted:
        fitted = f"fitted on published latencies, but not at {compute_precision(precision, eff)}: its compute factor is a prior"
    else:
        fitted = "fitted on published latencies"
    return f"roofline from {profile.file_name}, efficiency {eff.device_class} ({Path(eff.file).name}, {fitted})"


def layer_cost(profile: DeviceProfile, layer: Layer, precision: str) -> Cost:
    """Estimated cost of one layer at batch 1: weight bytes and latency, sourced to the TOML."""
    eff = efficiency_for(profile)
    seconds = layer_seconds(profile, eff, layer, precision)
    return Cost(weight_bytes(layer, precision), seconds * 1e3, "estimated", source_of(profile, eff, precision))


def model_estimate(
    profile: DeviceProfile, layers: Sequence[Layer], precisions: Mapping[str, str],
    batch: int = 1, default: str = FP32, efficiency: Efficiency | None = None,
) -> tuple[float, float]:
    """(latency_ms, fps) of a whole model: its layers in sequence plus the per-inference overhead.

    ``precisions`` maps layer names to precisions; layers not named run at ``default``.
    ``efficiency`` overrides the class's fitted factors (the fit evaluates candidates).
    """
    if batch < 1:
        raise InputError(f"batch must be at least 1 (got {batch})")
    eff = efficiency or efficiency_for(profile)
    seconds = eff.model_overhead_us * 1e-6
    seconds += sum(layer_seconds(profile, eff, lay, precisions.get(lay.name, default), batch) for lay in layers)
    latency_ms = seconds * 1e3
    return latency_ms, batch * 1e3 / latency_ms
