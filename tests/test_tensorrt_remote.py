"""--remote over SSH against an sshd started here on 127.0.0.1, and the trtexec log parser.

The board's ``trtexec`` is a stand-in that replays a real TensorRT log from tests/data/trtexec (see
its README): it exercises the transport and the parser only, and the report must mark what it
printed as a stand-in replay, never as a measurement.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from dscompile.errors import InputError
from dscompile.targets.tensorrt_log import STAND_IN_MARKER, parse_log
from dscompile.targets.tensorrt_remote import parse_remote

DATA = Path(__file__).parent / "data" / "trtexec"
RUN_LOG = DATA / "trtexec_run_trt10.16.log"
ERROR_LOG = DATA / "onnx_parser_error_trt10.16.log"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"

_STAND_IN = f"""#!/bin/sh
# {STAND_IN_MARKER}: replays a real trtexec log for the SSH transport test; nothing it prints is a measurement
here="$(dirname "$0")"
log=$(sed -n 1p "$here/replay"); rc=$(sed -n 2p "$here/replay")
printf '%s\\n' "$@" > "$here/last_args"
echo "{STAND_IN_MARKER}: replaying $(basename "$log"); not a measurement"
cat "$log"
for a in "$@"; do
  case "$a" in
    --saveEngine=*) [ "$rc" = 0 ] && printf 'stand-in: not a TensorRT engine\\n' > "${{a#--saveEngine=}}" ;;
    --timingCacheFile=*) printf 'stand-in timing cache\\n' > "${{a#--timingCacheFile=}}" ;;
  esac
done
exit "$rc"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    if not Path(SSHD).exists() or shutil.which("ssh") is None:
        pytest.skip("openssh-server / openssh-client not installed (.ci/run installs them)")
    d = tmp_path_factory.mktemp("board")
    for key in ("host_key", "user_key", "stranger_key"):
        _keygen(d / key)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    bindir = d / "bin"
    bindir.mkdir()
    (bindir / "trtexec").write_text(_STAND_IN)
    (bindir / "trtexec").chmod(0o755)
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        f"PubkeyAuthentication yes\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
        f"SetEnv PATH={bindir}:/usr/local/bin:/usr/bin:/bin\n"
        "Subsystem sftp internal-sftp\n"  # scp speaks SFTP, as a stock JetPack sshd serves it
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None:
            pytest.skip(f"sshd did not start: {proc.stderr.read()[-300:]}")
        time.sleep(0.05)
    for name, key in (("ssh_config", "user_key"), ("stranger_config", "stranger_key")):
        (d / name).write_text(
            f"Host *\n  IdentityFile {d / key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {d / 'known_hosts'}\n"
            "  StrictHostKeyChecking accept-new\n  LogLevel ERROR\n"
        )
    try:
        yield {"dir": d, "port": port, "remote": f"{getpass.getuser()}@127.0.0.1:{port}"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _replay(board, log: Path, rc: int) -> None:
    (board["dir"] / "bin" / "replay").write_text(f"{log}\n{rc}\n")


def _env(board, config="ssh_config") -> dict:
    return {"DSCOMPILE_SSH_CONFIG": str(board["dir"] / config)}


def test_remote_build_fetches_engine_and_marks_the_replay(cli, digits, board, tmp_path):
    _replay(board, RUN_LOG, 0)
    out = tmp_path / "orin"
    r = cli("--target", "jetson-orin", digits.onnx, "--remote", board["remote"], "-o", out, env=_env(board))
    assert r.returncode == 0, r.stderr
    assert (out / "model.engine").read_text().startswith("stand-in") and (out / "trtexec.log").exists()
    args = (board["dir"] / "bin" / "last_args").read_text().split()
    for flag in ("--onnx=model.qdq.onnx", "--stronglyTyped", "--saveEngine=model.engine", "--timingCacheFile=timing.cache"):
        assert flag in args
    engine = json.loads((out / "report.json").read_text())["tensorrt"]["engine"]
    timing = engine["timing"]
    assert engine["built"] and engine["remote"] == board["remote"]
    assert timing["kind"] == "stand-in replay: not a measurement"  # never reported as measured
    assert timing["throughput_qps"] == 15374.3 and timing["tensorrt"] == "10.16.1"
    assert set(timing["latency_ms"]) >= {"mean", "median", "p90", "p95", "p99"}
    assert timing["jetpack"].startswith("unknown")  # this machine is no Jetson: nothing pretends it is
    leftovers = subprocess.run(["sh", "-c", "ls -d ${TMPDIR:-/tmp}/dscompile.* 2>/dev/null || true"], capture_output=True, text=True)
    assert not leftovers.stdout.strip()


def test_remote_parser_error_names_the_node(cli, digits, board, tmp_path):
    _replay(board, ERROR_LOG, 1)
    out = tmp_path / "orin"
    r = cli("--target", "jetson-orin", digits.onnx, "--remote", board["remote"], "-o", out, env=_env(board))
    assert r.returncode == 1 and len(r.stderr_lines) == 1, r.stderr
    assert board["remote"] in r.stderr and "'UnknownModel-N-1-UnknownNode1' (UnknownNode1)" in r.stderr
    assert "Plugin not found" in r.stderr and not out.exists()


def test_remote_refusing_and_unreachable_hosts(cli, digits, board, tmp_path):
    out = tmp_path / "orin"
    user = getpass.getuser()
    r = cli("--target", "jetson-orin", digits.onnx, "--remote", board["remote"], "-o", out,
            env=_env(board, "stranger_config"))
    assert r.returncode == 1 and len(r.stderr_lines) == 1, r.stderr
    assert "authentication refused" in r.stderr and board["remote"] in r.stderr and not out.exists()
    closed = _free_port()
    r = cli("--target", "jetson-orin", digits.onnx, "--remote", f"{user}@127.0.0.1:{closed}", "-o", out, env=_env(board))
    assert r.returncode == 1 and len(r.stderr_lines) == 1, r.stderr
    assert f"127.0.0.1:{closed}" in r.stderr and "Connection refused" in r.stderr and not out.exists()


@pytest.mark.parametrize("bad", ["orin.local", "user@", "user@host:99999", "a@b@c"])
def test_parse_remote_rejects(bad):
    with pytest.raises(InputError):
        parse_remote(bad)


def test_parse_remote_defaults():
    r = parse_remote("nvidia@orin.local")
    assert (r.user, r.host, r.port) == ("nvidia", "orin.local", 22)
    assert parse_remote("nvidia@10.0.0.5:2222").port == 2222


def test_log_parser_on_real_logs():
    run = parse_log(RUN_LOG.read_text())
    assert run.passed and not run.failed and not run.stand_in and run.tensorrt == "10.16.1"
    assert run.throughput_qps == 15374.3
    assert run.latency_ms == {"min": 0.0410156, "max": 0.14917, "mean": 0.0441053, "median": 0.0440674,
                              "p90": 0.0450439, "p95": 0.0458984, "p99": 0.0512695}
    assert run.gpu_compute_ms["p99"] == 0.041748
    err = parse_log(ERROR_LOG.read_text())
    assert [e.node for e in err.parser_errors] == ["UnknownModel-N-1-UnknownNode1", "UnknownModel-N-3-UnknownNode2"]
    assert err.failed and "UnknownNode1" in err.first_error()


def test_log_parser_formats():
    from dscompile.targets.tensorrt_log import tensorrt_version

    assert tensorrt_version("8602") == "8.6.2" and tensorrt_version("100300") == "10.3.0"
    line = ("[I] Latency: min = 5.38959 ms, max 6.19507 ms, mean 5.93288 ms, median 6.02185 ms, "
            "percentile(99%) 6.17407 ms")  # TensorRT 8.x prints some stats without '='
    stats = parse_log(line).latency_ms
    assert stats["min"] == 5.38959 and stats["p99"] == 6.17407 and stats["median"] == 6.02185
