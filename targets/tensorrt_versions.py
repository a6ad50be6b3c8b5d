"""Which TensorRT a Jetson runs, and what that TensorRT can do, read from rules/*.toml.

A device profile names its JetPack (``[software] jetpack = "6.2"``); the JetPack table in
``rules/tensorrt_versions.toml`` says which TensorRT it ships and which operator table and
feature set (``rules/tensorrt_ops.toml``) apply. Nothing here hard-codes a version.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from dscompile.errors import InputError
from dscompile.profiles.devices import get_device

RULES_DIR = Path(__file__).parent / "rules"


@functools.cache
def load_rules(name: str) -> dict[str, Any]:
    """One rules file (``tensorrt_ops``, ``tensorrt_qdq``, ...) as a dict."""
    path = RULES_DIR / f"{name}.toml"
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:  # a packaging bug, not user input
        raise RuntimeError(f"{path}: cannot read TensorRT rules ({exc})") from exc


@dataclass(frozen=True)
class TensorRTRelease:
    """The TensorRT a board runs: versions, operator-table series and features, with sources."""

    jetpack: str
    tensorrt: str
    l4t: str
    series: str  # key into tensorrt_ops.toml / features (e.g. "10.x")
    strongly_typed: bool
    int4_weights: bool
    block_quantization: bool
    source: str

    @property
    def label(self) -> str:
        return f"TensorRT {self.tensorrt} (JetPack {self.jetpack})"

    def to_json(self) -> dict[str, Any]:
        return {
            "jetpack": self.jetpack, "tensorrt": self.tensorrt, "l4t": self.l4t, "ops_table": self.series,
            "strongly_typed": self.strongly_typed, "int4_weights": self.int4_weights, "source": self.source,
        }


def release_for_jetpack(jetpack: str) -> TensorRTRelease:
    table = load_rules("tensorrt_versions")
    row = table["jetpack"].get(jetpack)
    if row is None:
        known = ", ".join(table["jetpack"])
        raise InputError(f"JetPack {jetpack} is not in the TensorRT rules (known: {known})")
    feats = table["features"][row["ops"]]
    return TensorRTRelease(
        jetpack, row["tensorrt"], row["l4t"], row["ops"], bool(feats["strongly_typed"]),
        bool(feats["int4_weights"]), bool(feats["block_quantization"]), f"{row['source']}; {feats['source']}",
    )


def release_for_device(device_id: str) -> TensorRTRelease:
    """The TensorRT of a device profile's JetPack (``[software] jetpack`` in its TOML)."""
    profile = get_device(device_id)
    software = profile.meta.get("software", {})
    jetpack = str(software.get("jetpack", "")).strip()
    if not jetpack:
        raise InputError(f"{profile.file}: device profile has no [software] jetpack version")
    return release_for_jetpack(jetpack)


def release_for_tensorrt(version: str) -> TensorRTRelease:
    """The newest JetPack row whose TensorRT matches ``version`` by major.minor (from a board's log)."""
    table = load_rules("tensorrt_versions")
    want = ".".join(version.split(".")[:2])
    rows = [jp for jp, row in table["jetpack"].items() if ".".join(row["tensorrt"].split(".")[:2]) == want]
    if not rows:
        raise InputError(f"TensorRT {version} is not a JetPack release the rules know")
    return release_for_jetpack(rows[-1])


def dla_cores(device_id: str) -> int:
    """DLA engines on the device (the profile's ``dla_cores`` figure; 0 when it has none)."""
    return int(get_device(device_id).value("dla_cores", 0.0))
