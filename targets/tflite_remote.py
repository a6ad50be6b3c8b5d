"""``--remote adb:SERIAL`` for the snapdragon target: check the phone first, time the artifact after."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dscompile.errors import InputError
from dscompile.profiles.adb import DELEGATES, Adb, time_on_device
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
