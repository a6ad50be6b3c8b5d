"""Timing a .tflite on an Android phone over ADB with TensorFlow Lite's ``benchmark_model``.

The model and (when given) the ``benchmark_model`` binary are pushed to
``/data/local/tmp/dscompile`` and run once per delegate: XNNPACK on the CPU,
the GPU delegate, and the Qualcomm QNN delegate on the HTP through
``--external_delegate_path`` when its library is in that folder. Each run's
output is parsed into a measured cell. adb's own failures (no such device,
an unauthorized one, offline) become one clear error before anything is built.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dscompile.errors import InputError, MissingBackendError
from dscompile.profiles.benchmark_model import parse_benchmark_output

DEVICE_DIR = "/data/local/tmp/dscompile"
QNN_DELEGATE_LIB = "libQnnTFLiteDelegate.so"
ADB_INSTALL = "Android SDK platform-tools (developer.android.com/tools/releases/platform-tools), with adb on PATH"
DELEGATES = ("cpu", "gpu", "htp")
_FLAGS = {
    "cpu": ["--use_xnnpack=true"],
    "gpu": ["--use_gpu=true"],
    "htp": [f"--external_delegate_path={DEVICE_DIR}/{QNN_DELEGATE_LIB}", "--external_delegate_options=backend_type:htp"],
}
DELEGATE_LABELS = {"cpu": "XNNPACK CPU", "gpu": "GPU delegate", "htp": "QNN delegate, HTP backend"}


def adb_error(serial: str, text: str) -> InputError:
    """One line for what adb printed when it failed."""
    low = text.lower()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "no output")
    if "unauthorized" in low:
        return InputError(
            f"ADB device {serial!r} is unauthorized: unlock the phone and accept its USB-debugging prompt "
            f"(adb says: {first})"
        )
    if "not found" in low or "no devices" in low:
        return InputError(f"no ADB device {serial!r} is connected (check `adb devices`; adb says: {first})")
    if "offline" in low:
        return InputError(f"ADB device {serial!r} is offline: reconnect it (adb says: {first})")
    return InputError(f"adb failed on {serial!r}: {first}")


@dataclass
class Adb:
    serial: str
    executable: str = ""

    def __post_init__(self) -> None:
        self.executable = self.executable or shutil.which("adb") or ""
        if not self.executable:
            raise MissingBackendError("adb", ADB_INSTALL)

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run([self.executable, "-s", self.serial, *args], capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise InputError(f"adb {' '.join(args[:2])} on {self.serial!r} timed out after {timeout:.0f} s") from None
        if check and proc.returncode != 0:
            raise adb_error(self.serial, proc.stderr + proc.stdout)
        return proc

    def check(self) -> dict[str, str]:
        """The phone is connected and authorized; its model and SoC."""
        state = self.run("get-state").stdout.strip()
        if state != "device":
            raise adb_error(self.serial, state)
        props = {}
        for key in ("ro.product.model", "ro.board.platform", "ro.soc.model"):
            props[key] = self.run("shell", "getprop", key).stdout.strip()
        return props

    def shell(self, command: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.run("shell", command, check=check, timeout=timeout)

    def push(self, local: Path, remote: str) -> None:
        self.run("push", str(local), remote)

    def exists(self, remote: str) -> bool:
        return self.shell(f"ls {shlex.quote(remote)}", check=False).returncode == 0


def benchmark_command(model: str, delegate: str, threads: int, runs: int) -> str:
    flags = [f"--graph={model}", f"--num_threads={threads}", f"--num_runs={runs}", "--warmup_runs=5",
             "--report_peak_memory_footprint=true", *_FLAGS[delegate]]
    env = f"LD_LIBRARY_PATH={DEVICE_DIR} ADSP_LIBRARY_PATH={DEVICE_DIR}" if delegate == "htp" else ""
    return f"cd {DEVICE_DIR} && {env} ./benchmark_model {' '.join(flags)}".replace("  ", " ")


def time_on_device(
    adb: Adb, model: Path, binary: Path | None, delegates: Sequence[str] = DELEGATES,
    threads: int = 4, runs: int = 50,
) -> dict[str, Any]:
    """Push and run; one measured cell per delegate (or the reason it has none)."""
    props = adb.check()
    adb.shell(f"mkdir -p {DEVICE_DIR}")
    if binary is not None:
        if not Path(binary).is_file():
            raise InputError(f"--benchmark-binary {binary}: no such file")
        adb.push(Path(binary), f"{DEVICE_DIR}/benchmark_model")
        adb.shell(f"chmod 755 {DEVICE_DIR}/benchmark_model")
    elif not adb.exists(f"{DEVICE_DIR}/benchmark_model"):
        raise InputError(
            f"no benchmark_model on {adb.serial} in {DEVICE_DIR}: pass --benchmark-binary PATH "
            "(TensorFlow Lite's android_aarch64 benchmark_model)"
        )
    remote_model = f"{DEVICE_DIR}/{model.name}"
    adb.push(model, remote_model)
    phone = f"{props.get('ro.product.model') or adb.serial} ({props.get('ro.soc.model') or props.get('ro.board.platform')})"
    cells = []
    for d in delegates:
        if d == "htp" and not adb.exists(f"{DEVICE_DIR}/{QNN_DELEGATE_LIB}"):
            cells.append({"delegate": d, "kind": None,
                          "why": f"{QNN_DELEGATE_LIB} and the QNN HTP libraries are not in {DEVICE_DIR} (push them from the QAIRT SDK)"})
            continue
        proc = adb.shell(benchmark_command(remote_model, d, threads, runs), check=False)
        try:
            result = parse_benchmark_output(proc.stdout + proc.stderr)
        except InputError as exc:
            cells.append({"delegate": d, "kind": None, "why": str(exc)})
            continue
        # the requested delegate keeps the key; the name TFLite reports for it is kept beside
        timed = {("tflite_delegate" if k == "delegate" else k): v for k, v in result.to_json().items()}
        cells.append({**timed, "delegate": d, "kind": "measured",
                      "where": f"benchmark_model on {phone} over ADB, {DELEGATE_LABELS[d]}, {threads} threads"})
    return {"serial": adb.serial, "phone": phone, "cells": cells}
