"""CalibrationTable: per-tensor ranges (``dscompile-calibration/1``) and TensorRT's cache format."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dscompile.errors import InputError, OutputError
from dscompile.fileio import write_json, write_text

TABLE_FORMAT = "dscompile-calibration/1"
METHODS = ("entropy", "minmax", "percentile", "mse")


@dataclass(frozen=True)
class TensorRange:
    """Statistics of one tensor over the calibration data."""

    min: float
    max: float
    absmax: float
    amax: dict[str, float] = field(default_factory=dict)  # method -> symmetric threshold
    histogram: dict[str, Any] = field(default_factory=dict)  # {"bins": [...], "range": [lo, hi]}

    def threshold(self, method: str) -> float:
        if method not in self.amax:
            raise InputError(f"calibration table has no {method!r} threshold (it has: {', '.join(self.amax)})")
        return self.amax[method]

    def asymmetric(self, method: str | None = None) -> tuple[float, float, float, int]:
        """(min, max, scale, zero_point) for a uint8 tensor; ``method`` clips the range to its amax."""
        from dscompile.calibration.methods import asymmetric_range

        return asymmetric_range(self.min, self.max, self.threshold(method) if method else None)

    def to_json(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max, "absmax": self.absmax, "amax": self.amax, "histogram": self.histogram}


@dataclass(frozen=True)
class CalibrationTable:
    model_sha256: str
    data_sha256: str
    samples: int
    tensors: dict[str, TensorRange]
    extra: dict[str, Any] = field(default_factory=dict)

    def range(self, name: str) -> TensorRange:
        if name not in self.tensors:
            raise InputError(f"calibration table has no entry for tensor {name!r}")
        return self.tensors[name]

    def to_json(self) -> dict[str, Any]:
        d = {
            "format": TABLE_FORMAT,
            "model_sha256": self.model_sha256,
            "data_sha256": self.data_sha256,
            "samples": self.samples,
            "tensors": {k: v.to_json() for k, v in self.tensors.items()},
        }
        d.update(self.extra)
        return d

    def save(self, path: str | Path, force: bool = False) -> Path:
        return write_json(path, self.to_json(), force)

    @classmethod
    def from_json(cls, data: dict[str, Any], origin: str = "calibration table") -> CalibrationTable:
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise InputError(f"{origin}: not a dscompile calibration table (expected \"format\": \"{TABLE_FORMAT}\")")
        try:
            tensors = {
                name: TensorRange(
                    float(t["min"]), float(t["max"]), float(t["absmax"]),
                    {k: float(v) for k, v in t.get("amax", {}).items()}, t.get("histogram", {}),
                )
                for name, t in data["tensors"].items()
            }
            known = {"format", "model_sha256", "data_sha256", "samples", "tensors"}
            return cls(
                data["model_sha256"], data["data_sha256"], int(data["samples"]), tensors,
                {k: v for k, v in data.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{origin}: malformed calibration table ({exc})") from None

    @classmethod
    def load(cls, path: str | Path) -> CalibrationTable:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: no such calibration table") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_json(data, str(path))

    @property
    def settings(self) -> dict[str, Any]:
        return self.extra.get("settings", {})

    def check_model(self, model_sha256: str, force: bool = False) -> None:
        if self.model_sha256 != model_sha256 and not force:
            raise InputError(
                f"calibration table was made for another model (sha256 {self.model_sha256[:12]}…, "
                f"this one {model_sha256[:12]}…); recalibrate, or --force to use it anyway"
            )


def reusable_table(path: str | Path, model_sha256: str, data_sha256: str, settings: dict[str, Any],
                   force: bool = False) -> CalibrationTable | None:
    """The table at ``path`` when it was made for this model, data and settings; None to compute anew.

    A table for another model is refused, and one for other data or settings is
    not overwritten, unless ``force`` (which always recomputes).
    """
    path = Path(path)
    if force or not path.exists():
        return None
    try:
        table = CalibrationTable.load(path)
    except InputError:
        raise OutputError(f"{path}: already exists and is not a calibration table (use --force to overwrite)") from None
    table.check_model(model_sha256)
    if table.data_sha256 != data_sha256:
        raise OutputError(
            f"{path}: holds a table for other data (sha256 {table.data_sha256[:12]}…, this data "
            f"{data_sha256[:12]}…); use --force to recompute it"
        )
    if table.settings != settings:
        raise OutputError(f"{path}: holds a table made with other settings ({table.settings}); use --force to recompute it")
    return table


def trt_cache_text(table: CalibrationTable, method: str = "entropy", trt_version: int = 8601) -> str:
    """TensorRT calibration cache: a header line, then ``name: <hex of big-endian float32 scale>``.

    scale = amax / 127; the header names the calibrator that TensorRT checks on load.
    """
    algo = "MinMaxCalibration" if method == "minmax" else "EntropyCalibration2"
    lines = [f"TRT-{trt_version}-{algo}"]
    for name, tr in table.tensors.items():
        scale = tr.threshold(method) / 127.0
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    return "\n".join(lines) + "\n"


def write_trt_cache(table: CalibrationTable, path: str | Path, method: str = "entropy", force: bool = False) -> Path:
    return write_text(path, trt_cache_text(table, method), force)


def read_trt_cache(path: str | Path) -> tuple[str, dict[str, float]]:
    """(header, {tensor: scale}) from a TensorRT calibration cache."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise InputError(f"{path}: no such TensorRT calibration cache") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a TensorRT calibration cache (not text)") from None
    if not lines or not lines[0].startswith("TRT-"):
        raise InputError(f"{path}: not a TensorRT calibration cache (no TRT- header)")
    scales = {}
    for line in lines[1:]:
        if not line.strip():
            continue
        name, _, hexval = line.rpartition(": ")
        try:
            scales[name] = struct.unpack(">f", bytes.fromhex(hexval.strip()))[0]
        except ValueError:
            raise InputError(f"{path}: bad cache line {line!r}") from None
    return lines[0], scales
