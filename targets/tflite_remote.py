"""``--remote adb:SERIAL`` for the snapdragon target: check the phone first, time the artifact after."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dscompile.errors import InputError
from dscompile.profiles.adb import DELEGATE_LABELS, DELEGATES, Adb, time_on_device
from dscompile.profiles.devices import DeviceProfile
from dscompile.profiles.matrix import Cell, measured_cell, missing_cell
from dscompile.targets.base import BuildOptions


@dataclass(frozen=True)
class RemoteRequest:
    adb: Adb
    binary: Path | None
    delegates: tuple[str, ...]


def remote_request(options: BuildOptions) -> RemoteRequest | None:
    """The ADB phone to time on (checked now, so a bad serial fails before the build), or None."""
    remote = options.remote
    if not remote:
        return None
    if not str(remote).startswith("adb:") or len(str(remote)) <= 4:
        raise InputError(f"--remote {remote!r}: the snapdragon target times on a phone over ADB: --remote adb:SERIAL")
    binary = options.benchmark_binary
    if binary is not None and not Path(binary).is_file():
        raise InputError(f"--benchmark-binary {binary}: no such file")
    delegates = tuple(options.extra.get("delegates", DELEGATES))
    unknown = [d for d in delegates if d not in DELEGATES]
    if unknown:
        raise InputError(f"unknown delegate {unknown[0]!r} (known: {', '.join(DELEGATES)})")
    adb = Adb(str(remote)[4:])
    adb.check()
    return RemoteRequest(adb, Path(binary) if binary else None, delegates)


def time_remote(request: RemoteRequest, model: Path) -> dict[str, Any]:
    return time_on_device(request.adb, model, request.binary, request.delegates)


# ---------------------------------------------------------------- the FPS matrix (dscompile profile --remote)

_ORDER = {"htp": 0, "gpu": 1, "cpu": 2}  # the matrix shows the first measured cell: the NPU the profile describes


def remote_cells(
    path: Path, remote: str, profile: DeviceProfile, batch: int = 1, *, model: str = "", precision: str = "fp32",
    benchmark_binary: Path | None = None, **_: Any,
) -> list[Cell]:
    """Time a .tflite on a phone over ADB with benchmark_model: one measured cell per delegate (HTP first).

    No adb, no such device, an unauthorized or offline one: one-line errors before anything is
    written. A delegate that cannot run (no QNN libraries on the phone, a failed run) is a missing
    cell saying why, and the matrix goes on.
    """
    path = Path(path)
    name = model or path.stem
    if not str(remote).startswith("adb:") or len(str(remote)) <= 4:
        raise InputError(f"--remote {remote!r}: {profile.id} is timed on a phone over ADB: --remote adb:SERIAL")
    if benchmark_binary is not None and not Path(benchmark_binary).is_file():
        raise InputError(f"--benchmark-binary {benchmark_binary}: no such file")
    adb = Adb(str(remote)[4:])
    adb.check()
    if path.suffix != ".tflite":
        return [missing_cell(name, profile.id, precision, f"--remote {remote} runs a .tflite; {path.name} is not "
                             "(build one with --target snapdragon and profile it)", batch)]
    result = time_on_device(adb, path, Path(benchmark_binary) if benchmark_binary else None)
    cells = []
    for c in sorted(result["cells"], key=lambda c: _ORDER.get(c["delegate"], 9)):
        if c.get("kind") != "measured":
            cells.append(missing_cell(name, profile.id, precision, f"{c['delegate']} on {result['phone']}: {c['why']}"))
            continue
        p50 = c.get("median_ms") or c["avg_ms"]
        cells.append(measured_cell(
            name, profile.id, precision, 1, p50, c.get("max_ms"), source=f"measured: {c['where']}",
            runtime=f"TFLite benchmark_model, {c.get('tflite_delegate') or DELEGATE_LABELS[c['delegate']]}", machine=result["phone"],
            peak_memory_mb=c.get("peak_memory_mb"),
            extra={"remote": remote, "delegate": c["delegate"], "runs": c.get("runs"), "p99_is": "max of the timed runs"},
        ))
    return cells
