"""Device profiles: ``profiles/devices/*.toml``, every figure with its source.

    [device]
    name = "Jetson AGX Orin 64GB"
    target = "jetson-orin"          # the target that builds for it
    class = "jetson"                # device class, for estimate efficiency factors

    [figures.int8_tops_gpu_dense]
    value = 85.0
    unit = "TOPS"
    source = "NVIDIA Jetson AGX Orin Series Data Sheet DS-10662-001, table 1"

    [software]                      # versions of the runtime stack (strings)
    jetpack = "6.2"
    tensorrt = "10.3"

Every profile must carry ``REQUIRED`` figures, plus those its target needs
(``TARGET_REQUIRED``): the roofline estimate and the targets' cost models read
them by these names. A figure without a numeric value or a source, or a missing
required figure, is an error naming file and key: code never hard-codes a device
number, so every number must be traceable.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from dscompile.errors import InputError

DEVICES_DIR = Path(__file__).parent / "devices"
THIS_CPU = "this-cpu"

# Figure keys every profile has; "peak" means the accelerator the target uses
# (GPU on Orin, HTP on Snapdragon, the cores on a CPU), dense.
# A CPU profile may leave out peak_fp16_tflops: CPUs without fp16 arithmetic run fp16 at the fp32 rate.
REQUIRED = ("peak_int8_tops", "peak_fp32_tflops", "mem_bandwidth_gbps")
TARGET_REQUIRED: dict[str, tuple[str, ...]] = {
    "jetson-orin": (
        "peak_fp16_tflops", "gpu_int8_tops_dense", "gpu_int8_tops_sparse", "dla_int8_tops_dense",
        "dla_int8_tops_sparse", "dla_cores", "gpu_fp16_tflops", "gpu_fp32_tflops",
    ),
    "snapdragon": ("peak_fp16_tflops", "htp_int8_tops", "htp_fp16_supported", "gpu_fp16_tflops", "cpu_cores"),
}


@dataclass(frozen=True)
class Figure:
    value: float
    unit: str
    source: str


@dataclass(frozen=True)
class DeviceProfile:
    id: str
    name: str
    target: str
    device_class: str
    figures: dict[str, Figure]
    file: str
    meta: dict[str, Any] = field(default_factory=dict)

    def figure(self, key: str) -> Figure:
        if key not in self.figures:
            raise InputError(f"{self.file}: device profile has no figure {key!r}")
        return self.figures[key]

    def value(self, key: str, default: float | None = None) -> float:
        if key not in self.figures and default is not None:
            return default
        return self.figure(key).value

    @property
    def software(self) -> dict[str, str]:
        """Runtime versions from the ``[software]`` table (without its source line)."""
        sw = self.meta.get("software", {})
        return {k: str(v) for k, v in sw.items() if k != "source"} if isinstance(sw, dict) else {}

    @property
    def file_name(self) -> str:
        """``devices/<id>.toml``: how an estimate names the profile it came from."""
        return f"{Path(self.file).parent.name}/{Path(self.file).name}"

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "target": self.target, "class": self.device_class,
            "file": self.file, "software": self.software,
            "figures": {k: {"value": f.value, "unit": f.unit, "source": f.source} for k, f in self.figures.items()},
        }


def parse_profile(path: Path) -> DeviceProfile:
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None
    dev = data.get("device")
    if not isinstance(dev, dict) or "name" not in dev or "target" not in dev:
        raise InputError(f"{path}: needs a [device] table with name and target")
    figures: dict[str, Figure] = {}
    raw = data.get("figures", {})
    if not isinstance(raw, dict):
        raise InputError(f"{path}: [figures] must be a table of [figures.KEY] tables")
    for key, fig in raw.items():
        if not isinstance(fig, dict) or "value" not in fig:
            raise InputError(f"{path}: figure {key!r} has no value")
        if isinstance(fig["value"], bool) or not isinstance(fig["value"], (int, float)):
            raise InputError(f"{path}: figure {key!r} is not a number ({fig['value']!r})")
        if not str(fig.get("source", "")).strip():
            raise InputError(f"{path}: figure {key!r} has no source")
        figures[key] = Figure(float(fig["value"]), str(fig.get("unit", "")), str(fig["source"]))
    for key in (*REQUIRED, *TARGET_REQUIRED.get(str(dev["target"]), ())):
        if key not in figures:
            raise InputError(f"{path}: figure {key!r} is missing (every {dev['target']} profile needs it)")
    meta = {k: v for k, v in data.items() if k not in ("device", "figures")}
    return DeviceProfile(
        path.stem, dev["name"], dev["target"], dev.get("class", ""), figures, str(path), meta
    )


@functools.cache
def load_all(folder: Path = DEVICES_DIR) -> tuple[DeviceProfile, ...]:
    return tuple(parse_profile(p) for p in sorted(folder.glob("*.toml")))


def get_device(device_id: str, folder: Path = DEVICES_DIR) -> DeviceProfile:
    profiles = {p.id: p for p in load_all(folder)}
    if device_id not in profiles:
        known = ", ".join([THIS_CPU, *profiles]) if profiles else THIS_CPU
        raise InputError(f"unknown device {device_id!r} (known: {known})")
    return profiles[device_id]
