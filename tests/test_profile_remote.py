"""``dscompile profile --remote``: cells measured on a Jetson over SSH and on a phone over ADB.

The SSH board is the sshd of tests/test_tensorrt_remote.py on 127.0.0.1 whose ``trtexec`` is a
stand-in replaying a real TensorRT log: it exercises the transport, the log parser and the cell,
and what it prints must never become a measured cell. No phone is attached: ADB is checked for its
clean one-line errors (no adb, no such device).
"""

from __future__ import annotations

import json
import os

import pytest

from dscompile.profiles.devices import get_device
from dscompile.targets.tensorrt_log import measured_cells, parse_log
from dscompile.targets.tensorrt_remote import _timing_cell
from tests import test_tensorrt_remote as ssh_tests
from tests import test_tflite_adb as adb_tests
from tests.test_tensorrt_remote import ERROR_LOG, RUN_LOG, _env, _free_port, _replay

board = ssh_tests.board  # the loopback sshd with the trtexec stand-in
fake_adb = adb_tests.fake_adb  # an adb that prints what adb prints when no phone is attached

ORIN = "jetson-agx-orin-64gb"
QUICK = ("--budget", "0.2", "--no-batch-search")


def _rows(folder) -> list[dict]:
    return json.loads((folder / "matrix.json").read_text())["rows"]


def test_stand_in_trtexec_is_never_a_measured_cell(cli, digits, board, tmp_path):
    _replay(board, RUN_LOG, 0)
    out = tmp_path / "m"
    r = cli("profile", digits.onnx, "--devices", f"this-cpu,{ORIN}", "--remote", board["remote"], "-o", out,
            *QUICK, env=_env(board))
    assert r.returncode == 0, r.stderr
    orin = [row for row in _rows(out) if row["device"] == ORIN]
    assert {row["kind"] for row in orin} == {"estimated", "missing"}  # the replay gave no measured cell
    (why,) = [row["source"] for row in orin if row["kind"] == "missing"]
    assert why.startswith("not a measurement: trtexec on ") and board["remote"] in why and "stand-in" in why
    args = (board["dir"] / "bin" / "last_args").read_text().split()
    assert "--onnx=model.qdq.onnx" in args and "--stronglyTyped" in args  # the profile says TensorRT 10.3


def test_rejected_model_is_a_missing_cell_naming_the_node(cli, digits, board, tmp_path):
    _replay(board, ERROR_LOG, 1)
    out = tmp_path / "m"
    r = cli("profile", digits.onnx, "--devices", ORIN, "--remote", board["remote"], "-o", out, env=_env(board))
    assert r.returncode == 0, r.stderr
    (why,) = [row["source"] for row in _rows(out) if row["kind"] == "missing"]
    assert "'UnknownModel-N-1-UnknownNode1' (UnknownNode1)" in why and board["remote"] in why


def test_unreachable_board_is_one_line_before_measuring(cli, digits, board, tmp_path):
    out = tmp_path / "m"
    closed = f"{board['remote'].split('@')[0]}@127.0.0.1:{_free_port()}"
    r = cli("profile", digits.onnx, "--devices", f"this-cpu,{ORIN}", "--remote", closed, "-o", out, env=_env(board))
    assert r.returncode == 1 and len(r.stderr_lines) == 1, r.stderr
    assert "Connection refused" in r.stderr and not out.exists()
    r = cli("profile", digits.onnx, "--devices", ORIN, "--remote", board["remote"], "-o", out,
            env=_env(board, "stranger_config"))
    assert r.returncode == 1 and "authentication refused" in r.stderr and not out.exists()


def test_a_real_trtexec_log_becomes_a_cell_stamped_with_the_board():
    """The cell arithmetic on a real log (the log's own machine, not a Jetson: no report shows this)."""
    run = parse_log(RUN_LOG.read_text())
    timing = {**measured_cells(run, "trtexec on orin-01 over SSH (nvidia@orin-01:22)"), "board": "orin-01",
              "jetpack": "6.2", "l4t": "R36.4.3"}
    cell = _timing_cell({"remote": "nvidia@orin-01:22", "timing": timing}, "digits", ORIN, "int8", 1)
    assert cell.kind == "measured" and cell.p50_ms == run.latency_ms["median"] and cell.p99_ms == run.latency_ms["p99"]
    assert cell.source == "measured: trtexec on orin-01 over SSH (nvidia@orin-01:22)" and cell.machine == "orin-01"
    assert cell.runtime == "TensorRT 10.16.1 (trtexec)" and cell.extra["remote"] == "nvidia@orin-01:22"
    assert cell.extra["throughput_qps"] == 15374.3 and cell.extra["jetpack"] == "6.2"
    stand_in = _timing_cell({"remote": "x", "timing": {**timing, "kind": "stand-in replay: not a measurement"}},
                            "digits", ORIN, "int8", 1)
    assert stand_in.kind == "missing" and stand_in.fps is None


def test_adb_without_a_phone_is_one_line(cli, digits, fake_adb, tmp_path):
    out = tmp_path / "m"
    env = {"PATH": os.environ["PATH"], "FAKE_ADB_STATE": "none"}
    r = cli("profile", digits.onnx, "--devices", "this-cpu,snapdragon-8-gen2", "--remote", "adb:R5CT1234", "-o", out,
            env=env)
    assert r.returncode == 1, r.stderr
    assert r.stderr_lines == ["dscompile: error: no ADB device 'R5CT1234' is connected (check `adb devices`; "
                              "adb says: adb: device 'R5CT1234' not found)"]
    assert not out.exists()


@pytest.mark.parametrize("remote, devices, match", [
    ("adb:R5CT1234", ("this-cpu", ORIN), "no device of target snapdragon"),
    ("nvidia@orin.local", ("snapdragon-8-gen2",), "no device of target jetson-orin"),
    ("orin.local", (ORIN,), "expected user@host"),
    ("adb:R5CT1234", ("snapdragon-8-gen2",), "adb"),  # no adb here (or, where there is one, no such phone)
])
def test_remote_needs_a_matching_device_a_valid_address_and_a_board(digits, remote, devices, match):
    from dscompile.errors import DscompileError
    from dscompile.profiler import ProfileOptions, profile_paths

    with pytest.raises(DscompileError, match=match) as exc:
        profile_paths([digits.onnx], ProfileOptions(devices=devices, remote=remote))
    assert "\n" not in str(exc.value)


def test_remote_device_is_the_first_of_its_kind():
    from dscompile.profiler import remote_device

    profiles = [get_device(d) for d in ("snapdragon-8-gen2", "jetson-orin-nano-8gb", ORIN)]
    assert remote_device("nvidia@orin", profiles).id == "jetson-orin-nano-8gb"
    assert remote_device("adb:X", profiles).id == "snapdragon-8-gen2"
