"""Fit the roofline's efficiency factors per device class on published latencies.

``published/*.toml`` holds measurements with their sources; each is marked
``fit`` (fits its device class's factors), ``fit_device`` (fits only its own
device's two corrections, compute and overhead scale, with the class factors
fixed: for devices whose peak figures are uncertain) or ``holdout`` (only
checked). Each fit minimises the squared log error of the estimate over its
points, with a weak pull toward the prior so classes with few points stay
well-posed; the report gives the error of every point, fitted or held out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tomllib

from dscompile.compiler.capabilities import Layer
from dscompile.errors import InputError
from dscompile.profiles.devices import get_device
from dscompile.profiles.estimate import (
    DeviceScale,
    Efficiency,
    load_efficiency,
    model_estimate,
    scaled,
)

PUBLISHED_DIR = Path(__file__).parent / "published"
ROLES = ("fit", "fit_device", "holdout")


@dataclass(frozen=True)
class Published:
    model: str
    device: str
    precision: str
    batch: int
    latency_ms: float
    role: str
    runtime: str
    source: str
    file: str
    classes: int | None = None


def load_published(folder: Path = PUBLISHED_DIR) -> list[Published]:
    """Every measurement in ``folder``; a missing field or non-numeric latency names file and entry."""
    out: list[Published] = []
    for path in sorted(folder.glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"{path}: not valid TOML ({exc})") from None
        for i, m in enumerate(data.get("measurement", [])):
            where = f"{path}: measurement #{i + 1}"
            for key in ("model", "device", "precision", "source", "role"):
                if not str(m.get(key, "")).strip():
                    raise InputError(f"{where} has no {key}")
            lat = m.get("latency_ms")
            if isinstance(lat, bool) or not isinstance(lat, (int, float)) or lat <= 0:
                raise InputError(f"{where}: latency_ms is missing or not a positive number ({lat!r})")
            if m["role"] not in ROLES:
                raise InputError(f"{where}: role must be one of {', '.join(ROLES)} (got {m['role']!r})")
            out.append(Published(
                m["model"], m["device"], m["precision"], int(m.get("batch", 1)), float(lat), m["role"],
                str(m.get("runtime", "")), str(m["source"]), str(path), m.get("classes"),
            ))
    return out


# (reference network, output classes or None, ops the class does not fuse) -> its layers
LayersFor = Callable[[str, "int | None", frozenset], Sequence[Layer]]

# Parameter vector, in logs: compute int8, compute fp16, memory, activation DRAM fraction,
# layer overhead (us), model overhead (us), fp16 layer-overhead multiplier, depthwise rate.
_LOWER = np.log([0.01, 0.01, 0.05, 0.01, 0.05, 1.0, 0.25, 0.001])
_UPPER = np.log([1.0, 1.0, 0.9, 1.0, 200.0, 5000.0, 4.0, 1.0])


def _apply(eff: Efficiency, theta: np.ndarray) -> Efficiency:
    v = [float(x) for x in np.exp(theta)]
    return replace(
        eff, compute={**eff.compute, "int8": v[0], "fp16": v[1]}, memory=v[2], activation_dram=v[3],
        # fp32 launches like fp16 (no published fp32 figure to fit it apart)
        layer_overhead_us=v[4], model_overhead_us=v[5], overhead_scale={**eff.overhead_scale, "fp16": v[6], "fp32": v[6]},
        depthwise_rate=v[7],
    )


def _theta(eff: Efficiency) -> np.ndarray:
    x = [eff.compute_for("int8"), eff.compute_for("fp16"), eff.memory, eff.activation_dram,
         eff.layer_overhead_us, eff.model_overhead_us, eff.overhead_scale.get("fp16", 1.0), eff.depthwise_rate]
    return np.clip(np.log(x), _LOWER + 1e-9, _UPPER - 1e-9)


def estimate_ms(point: Published, layers: Sequence[Layer], eff: Efficiency | None = None) -> float:
    profile = get_device(point.device)
    return model_estimate(profile, layers, {}, point.batch, default=point.precision, efficiency=eff)[0]


def fit_class(device_class: str, points: Sequence[Published], layers_for: LayersFor, prior_weight: float = 0.02) -> Efficiency:
    """Factors for one class fitted on its ``fit`` points (log-error least squares, weak prior)."""
    from scipy.optimize import least_squares

    prior = load_efficiency()[device_class]
    fit_pts = [p for p in points if p.role == "fit"]
    if not fit_pts:
        raise InputError(f"class {device_class!r}: no published measurement marked role = \"fit\"")
    layers = [layers_for(p.model, p.classes, prior.unfused_ops) for p in fit_pts]
    theta0 = _theta(prior)

    def residuals(theta: np.ndarray) -> np.ndarray:
        eff = _apply(prior, theta)
        errs = [math.log(estimate_ms(p, lay, eff) / p.latency_ms) for p, lay in zip(fit_pts, layers, strict=True)]
        return np.concatenate([errs, prior_weight * (theta - theta0)])

    result = least_squares(residuals, theta0, bounds=(_LOWER, _UPPER))
    return _apply(prior, result.x)


def fit_device(device: str, points: Sequence[Published], layers_for: LayersFor, prior_weight: float = 0.02) -> DeviceScale:
    """One device's compute and overhead scales, fitted on its ``fit_device`` points (class factors fixed)."""
    from scipy.optimize import least_squares

    base = load_efficiency()[get_device(device).device_class]
    pts = [p for p in points if p.device == device and p.role == "fit_device"]
    if not pts:
        raise InputError(f"device {device!r}: no published measurement marked role = \"fit_device\"")
    layers = [layers_for(p.model, p.classes, base.unfused_ops) for p in pts]

    def scale(theta: np.ndarray) -> DeviceScale:
        return DeviceScale(device, float(np.exp(theta[0])), float(np.exp(theta[1])), "")

    def residuals(theta: np.ndarray) -> np.ndarray:
        eff = scaled(base, scale(theta))
        errs = [math.log(estimate_ms(p, lay, eff) / p.latency_ms) for p, lay in zip(pts, layers, strict=True)]
        return np.concatenate([errs, prior_weight * theta])

    x = least_squares(residuals, np.zeros(2), bounds=(np.log([0.1, 0.05]), np.log([10.0, 20.0]))).x
    used = "; ".join(f"{p.model}/{p.precision}" for p in pts)
    return replace(scale(x), source=f"fitted on {len(pts)} published latencies of this device in "
                                    f"published/{Path(pts[0].file).name} ({used})")


def error_table(points: Sequence[Published], layers_for: LayersFor) -> list[dict[str, object]]:
    """Each published point beside the current estimate (factors from efficiency.toml)."""
    rows = []
    effs = load_efficiency()
    for p in points:
        est = estimate_ms(p, layers_for(p.model, p.classes, effs[class_of(p)].unfused_ops))
        rows.append({
            "model": p.model, "device": p.device, "precision": p.precision, "batch": p.batch, "role": p.role,
            "published_ms": p.latency_ms, "estimate_ms": round(est, 4), "error": round(est / p.latency_ms - 1, 4),
            "source": p.source,
        })
    return rows


def class_of(point: Published) -> str:
    return get_device(point.device).device_class


def efficiency_toml(effs: dict[str, Efficiency], summaries: dict[str, str],
                    devices: dict[str, DeviceScale] | None = None) -> str:
    """The text of efficiency.toml for fitted classes (classes not refitted keep their prior)."""
    lines = [
        "# Efficiency factors per device class for the roofline in estimate.py.",
        "# Written by benchmarks/fit_estimates.py --write from profiles/published/*.toml; do not edit by hand.",
        "",
    ]
    for cls, eff in effs.items():
        comp = ", ".join(f"{k} = {v:.4g}" for k, v in sorted(eff.compute.items()))
        lines += [
            f"[classes.{cls}]",
            f'source = "{summaries.get(cls, eff.source)}"',
            f"memory = {eff.memory:.4g}",
            f"activation_dram = {eff.activation_dram:.4g}",
            f"depthwise_rate = {eff.depthwise_rate:.4g}",
            f"reference_clock_mhz = {eff.reference_clock_mhz:.4g}",
            f"layer_overhead_us = {eff.layer_overhead_us:.4g}",
            f"model_overhead_us = {eff.model_overhead_us:.4g}",
            f'weight_only_compute = "{eff.weight_only_compute}"',
            f"compute = {{ {comp} }}",
        ]
        if cls in summaries:
            lines.append('fitted = ["int8", "fp16"]  # precisions with published figures; others keep their prior')
        if eff.unfused_ops:
            lines.append("unfused_ops = [" + ", ".join(f'"{o}"' for o in sorted(eff.unfused_ops)) + "]")
        if eff.overhead_scale:
            lines.append("overhead_scale = { " + ", ".join(f"{k} = {v:.4g}" for k, v in eff.overhead_scale.items()) + " }")
        if eff.rate_scale:
            lines.append("rate_scale = { " + ", ".join(f"{k} = {v:.4g}" for k, v in eff.rate_scale.items()) + " }")
        lines.append("")
    for dev, sc in (devices or {}).items():
        lines += [f"[devices.{dev}]  # corrections of its class's factors", f'source = "{sc.source}"',
                  f"compute = {sc.compute:.4g}", f"overhead = {sc.overhead:.4g}", ""]
    return "\n".join(lines)


__all__ = [
    "PUBLISHED_DIR", "Published", "class_of", "efficiency_toml", "error_table",
    "estimate_ms", "fit_class", "fit_device", "load_published",
]
