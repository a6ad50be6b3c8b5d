"""Build and time the engine on the Jetson over SSH (``--remote user@host[:port]``).

The system's ssh/scp in batch mode (key-based, never a password prompt): copy model.qdq.onnx to a
temporary folder on the board, run trtexec there (build, then its timing run), fetch the engine,
timing cache and log back, parse throughput and latency, and stamp them with the board's JetPack
and TensorRT versions read from the board. ``DSCOMPILE_SSH_CONFIG`` names an ssh_config file to
use instead of ~/.ssh/config (ssh -F).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dscompile.errors import DscompileError, InputError, MissingBackendError
from dscompile.profiles.devices import DeviceProfile
from dscompile.profiles.matrix import Cell, measured_cell, missing_cell
from dscompile.targets.tensorrt_log import measured_cells, parse_log
from dscompile.targets.tensorrt_script import (
    ENGINE_FILE,
    LOG_FILE,
    MODEL_FILE,
    TIMING_CACHE_FILE,
    TrtexecJob,
)
from dscompile.targets.tensorrt_shapes import Profile

CONNECT_TIMEOUT_S = 10
BUILD_TIMEOUT_S = 3 * 3600  # large models take a long time to build on an Orin Nano
_REMOTE = re.compile(r"^(?P<user>[^@\s:/]+)@(?P<host>[^@\s:/]+|\[[0-9a-fA-F:]+\])(?::(?P<port>\d+))?$")

# Read on the board: where to work, what board it is, its L4T, JetPack and trtexec.
_PROBE = r"""set -e
d=$(mktemp -d "${TMPDIR:-/tmp}/dscompile.XXXXXX")
echo "dir=$d"
echo "board=$(tr -d '\000' < /proc/device-tree/model 2>/dev/null || uname -n)"
echo "l4t=$(head -n 1 /etc/nv_tegra_release 2>/dev/null || true)"
echo "jetpack=$(dpkg-query -W -f='${Version}' nvidia-jetpack 2>/dev/null || true)"
echo "trtexec=$(command -v trtexec || { test -x /usr/src/tensorrt/bin/trtexec && echo /usr/src/tensorrt/bin/trtexec; } || true)"
"""


class RemoteError(DscompileError):
    """The board could not be reached, refused us, or its TensorRT failed."""


class TrtexecFailed(RemoteError):
    """The board was reached but its trtexec rejected the model (parser or builder error)."""


@dataclass(frozen=True)
class Remote:
    user: str
    host: str
    port: int = 22

    @property
    def label(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def parse_remote(text: str) -> Remote:
    m = _REMOTE.match(text.strip())
    if not m:
        raise InputError(f"--remote {text!r}: expected user@host[:port], e.g. nvidia@orin.local or nvidia@10.0.0.5:2222")
    port = int(m["port"]) if m["port"] else 22
    if not 0 < port < 65536:
        raise InputError(f"--remote {text!r}: port {port} is out of range")
    return Remote(m["user"], m["host"].strip("[]"), port)


def _why(stderr: str) -> str:
    lines = [s.strip() for s in stderr.splitlines() if s.strip() and not s.startswith("Warning: Permanently added")]
    return lines[-1] if lines else "no message"


class SshTransport:
    """ssh/scp to one board, batch mode; every failure is one line naming the host and the step."""

    def __init__(self, remote: Remote, config: str | None = None) -> None:
        for tool in ("ssh", "scp"):
            if shutil.which(tool) is None:
                raise MissingBackendError(f"the {tool} client (needed for --remote)", "apt-get install openssh-client")
        self.remote = remote
        self.config = config if config is not None else os.environ.get("DSCOMPILE_SSH_CONFIG")

    def _opts(self) -> list[str]:
        opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}"]
        return (["-F", self.config] if self.config else []) + opts

    def _fail(self, step: str, proc: subprocess.CompletedProcess) -> RemoteError:
        why = _why(proc.stderr)
        if "Permission denied" in why or "Too many authentication failures" in why:
            hint = "; --remote uses key-based SSH in batch mode: add your public key to the board's authorized_keys"
            return RemoteError(f"remote {self.remote.label}: authentication refused during {step} ({why}){hint}")
        return RemoteError(f"remote {self.remote.label}: {step} failed ({why})")

    def _call(self, argv: list[str], step: str, timeout: float) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RemoteError(f"remote {self.remote.label}: {step} timed out after {timeout:.0f} s") from None
        if proc.returncode == 255 or (argv[0] == "scp" and proc.returncode != 0):
            raise self._fail(step, proc)
        return proc

    def run(self, command: str, step: str, timeout: float = 120) -> subprocess.CompletedProcess:
        target = f"{self.remote.user}@{self.remote.host}"
        return self._call(["ssh", *self._opts(), "-p", str(self.remote.port), target, command], step, timeout)

    def put(self, files: list[Path], remote_dir: str, timeout: float = 600) -> None:
        dest = f"{self.remote.user}@{self._host()}:{remote_dir}/"
        self._call(["scp", "-q", *self._opts(), "-P", str(self.remote.port), *map(str, files), dest], "copying the model", timeout)

    def get(self, remote_path: str, local: Path, timeout: float = 600) -> None:
        src = f"{self.remote.user}@{self._host()}:{remote_path}"
        self._call(["scp", "-q", *self._opts(), "-P", str(self.remote.port), src, str(local)], f"fetching {Path(remote_path).name}", timeout)

    def _host(self) -> str:
        return f"[{self.remote.host}]" if ":" in self.remote.host else self.remote.host


def probe(ssh: SshTransport) -> dict[str, str]:
    proc = ssh.run(_PROBE, "connecting")
    if proc.returncode != 0:
        raise RemoteError(f"remote {ssh.remote.label}: reading the board's versions failed ({_why(proc.stderr)})")
    info = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    if not info.get("dir"):
        raise RemoteError(f"remote {ssh.remote.label}: could not make a work folder on the board")
    return info


def _l4t(line: str) -> str:
    """'# R36 (release), REVISION: 4.3, ...' -> 'R36.4.3'."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)", line)
    return f"R{m.group(1)}.{m.group(2)}" if m else ""


def _jetpack(version: str) -> str:
    """dpkg's nvidia-jetpack version '6.2+b77' -> '6.2'."""
    m = re.match(r"(\d+(?:\.\d+)*)", version)
    return m.group(1) if m else ""


def build_remote(stage: Path, job: TrtexecJob, remote_text: str) -> dict[str, Any]:
    """Build and time ``stage/model.qdq.onnx`` on the board; fetch the engine, log and timing cache into ``stage``."""
    ssh = SshTransport(parse_remote(remote_text))
    info = probe(ssh)
    workdir = info["dir"]
    try:
        return _build(ssh, info, workdir, stage, job)
    finally:
        # if the board went away after the build, its /tmp folder is all that is left behind
        with contextlib.suppress(RemoteError):
            ssh.run(f"rm -rf {shlex.quote(workdir)}", "cleaning up", timeout=60)


def _build(ssh: SshTransport, info: dict[str, str], workdir: str, stage: Path, job: TrtexecJob) -> dict[str, Any]:
    label = ssh.remote.label
    trtexec = info.get("trtexec", "")
    if not trtexec:
        raise RemoteError(f"remote {label}: no trtexec on the board (JetPack installs /usr/src/tensorrt/bin/trtexec)")
    ssh.put([p for p in (stage / MODEL_FILE, stage / f"{MODEL_FILE}.data") if p.exists()], workdir)
    command = f"cd {shlex.quote(workdir)} && {job.command(shlex.quote(trtexec))} > {LOG_FILE} 2>&1; echo rc=$?"
    proc = ssh.run(command, "running trtexec", timeout=BUILD_TIMEOUT_S)
    rc = re.search(r"rc=(\d+)", proc.stdout)
    ssh.get(f"{workdir}/{LOG_FILE}", stage / LOG_FILE)
    run = parse_log((stage / LOG_FILE).read_text(errors="replace"))
    if rc is None or int(rc.group(1)) != 0 or run.failed:
        raise TrtexecFailed(f"remote {label}: {run.first_error()}")
    ssh.get(f"{workdir}/{ENGINE_FILE}", stage / ENGINE_FILE)
    ssh.get(f"{workdir}/{TIMING_CACHE_FILE}", stage / TIMING_CACHE_FILE)
    board = {
        "board": info.get("board", ""), "l4t": _l4t(info.get("l4t", "")),
        "jetpack": _jetpack(info.get("jetpack", "")) or "unknown (no nvidia-jetpack package)",
        "tensorrt": run.tensorrt or "unknown",
    }
    where = f"trtexec on {board['board'] or ssh.remote.host} over SSH ({label}), TensorRT {board['tensorrt']}, JetPack {board['jetpack']}"
    timing = measured_cells(run, where)
    timing.update(board)
    return {"built": True, "where": "remote", "remote": label, "board": board, "engine": ENGINE_FILE,
            "log": LOG_FILE, "timing": timing}


# ---------------------------------------------------------------- the FPS matrix (dscompile profile --remote)


def remote_cells(
    path: Path, remote: str, profile: DeviceProfile, batch: int = 1, *, model: str = "", precision: str = "fp32",
    shapes: dict[str, tuple] | None = None, **_: Any,
) -> list[Cell]:
    """Build and time an ONNX model or QDQ artifact on the Jetson over SSH: one measured cell.

    A board that cannot be reached or refuses us raises (one line, before anything is written); a
    model the board's TensorRT rejects gives a missing cell saying why, and the matrix goes on. A
    trtexec that is a test stand-in (its log carries STAND_IN_MARKER) gives a missing cell: what it
    prints is never reported as a measurement of a board.
    """
    path = Path(path)
    name = model or path.name.split(".")[0]
    if path.suffix != ".onnx":
        return [missing_cell(name, profile.id, precision, f"--remote over SSH builds the engine from ONNX; {path.name} "
                             "is not (profile the build folder or its model.qdq.onnx)", batch)]
    parse_remote(remote)  # bad syntax is the user's one-line error, not a cell
    try:
        job_shapes, run_batch = _shapes_at_batch(path, shapes or {}, batch)
    except InputError as exc:
        return [missing_cell(name, profile.id, precision, f"not measured: {exc}", batch)]
    with tempfile.TemporaryDirectory(prefix="dscompile-remote-") as tmp:
        stage = Path(tmp)
        shutil.copyfile(path, stage / MODEL_FILE)
        job = TrtexecJob(strongly_typed=_strongly_typed(profile), shapes=job_shapes)
        try:
            result = build_remote(stage, job, remote)
        except TrtexecFailed as exc:
            return [missing_cell(name, profile.id, precision, f"not measured: {exc}", run_batch)]
    return [_timing_cell(result, name, profile.id, precision, run_batch)]


def _timing_cell(result: dict[str, Any], name: str, device: str, precision: str, batch: int) -> Cell:
    timing = result["timing"]
    where = timing.get("where", result.get("remote", "the board"))
    if timing.get("kind") != "measured":
        return missing_cell(name, device, precision, f"not a measurement: {where} ({timing.get('kind')})", batch)
    lat = timing.get("latency_ms", {})
    p50 = lat.get("median", lat.get("mean"))
    if not p50:
        return missing_cell(name, device, precision, f"trtexec printed no latency ({where})", batch)
    extra = {k: timing[k] for k in ("throughput_qps", "gpu_compute_ms", "jetpack", "l4t") if timing.get(k)}
    return measured_cell(
        name, device, precision, batch, float(p50), float(lat.get("p99", p50)),
        source=f"measured: {where}", runtime=f"TensorRT {timing.get('tensorrt') or '?'} (trtexec)",
        machine=str(timing.get("board") or result.get("remote", "")), extra={"remote": result.get("remote"), **extra},
    )


def _strongly_typed(profile: DeviceProfile) -> bool:
    """--stronglyTyped exists from TensorRT 10 (the profile's [software] tensorrt); 8.x takes --int8 --fp16."""
    m = re.match(r"(\d+)", profile.software.get("tensorrt", "10"))
    return not m or int(m.group(1)) >= 10


def _shapes_at_batch(path: Path, shapes: dict[str, tuple], batch: int) -> tuple[Profile | None, int]:
    """trtexec shapes for the model's dynamic inputs at ``batch`` (None: a static model runs at its own batch)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    fixed: dict[str, tuple[int, ...]] = {}
    own_batch = 1
    for vi in (v for v in model.graph.input if v.name not in inits):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if None not in dims:
            own_batch = dims[0] if dims else own_batch
            continue
        given = list(shapes.get(vi.name, ()))
        if len(given) != len(dims) or not all(isinstance(g, int) and g > 0 for g in given[1:]):
            raise InputError(f"{path.name}: input {vi.name!r} has dynamic dimensions: give --input-shape "
                             f"{vi.name}:1x... so the board can build it")
        fixed[vi.name] = tuple([batch, *given[1:]])
    if not fixed:
        return None, own_batch
    return {"min": fixed, "opt": fixed, "max": fixed}, batch
