"""Mutations of real model and data files, and the check each mutated run must pass.

Shared by tests/reliability/test_fuzz.py (a bounded count and time) and benchmarks/fuzz.py (longer runs).
Cases run through the real CLI in tests/reliability/fuzz_driver.py processes: one interpreter start-up
for many cases, a hang or crash still caught per case.
"""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[2]


def bit_flips(data: bytes, rng: np.random.Generator, count: int = 8) -> bytes:
    buf = bytearray(data)
    for pos in rng.integers(0, len(buf) * 8, count):
        buf[pos // 8] ^= 1 << (pos % 8)
    return bytes(buf)


def truncation(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def onnx_field_swap(data: bytes, rng: np.random.Generator) -> bytes:
    """Swap or corrupt one structural field through onnx's protobuf API (the file still parses)."""
    m = onnx.load_from_string(data)
    nodes, inits = m.graph.node, m.graph.initializer
    kind = int(rng.integers(0, 6))
    i, j = (int(v) for v in rng.choice(len(nodes), 2, replace=False))
    if kind == 0:
        nodes[i].op_type, nodes[j].op_type = nodes[j].op_type, nodes[i].op_type
    elif kind == 1:
        nodes[i].input[0], nodes[j].input[0] = nodes[j].input[0], nodes[i].input[0]
    elif kind == 2 and inits:
        t = inits[int(rng.integers(0, len(inits)))]
        t.dims[0] = int(t.dims[0]) + 1
    elif kind == 3:
        m.graph.input[0].type.tensor_type.elem_type = int(rng.choice([2, 6, 7, 9, 11]))
    elif kind == 4 and inits:
        del inits[int(rng.integers(0, len(inits)))]
    else:
        nodes[i].output[0] = nodes[j].output[0]
    return m.SerializeToString()


def npz_mutation(data: bytes, rng: np.random.Generator) -> bytes:
    """A byte-level mutation, or a well-formed .npz whose array has the wrong dtype/shape/values."""
    kind = int(rng.integers(0, 4))
    if kind == 0:
        return bit_flips(data, rng, 16)
    if kind == 1:
        return truncation(data, rng)
    with np.load(io.BytesIO(data)) as z:
        x = z["x"]
    x = {2: x.astype(np.float16).reshape(len(x), -1), 3: np.where(rng.random(x.shape) < 0.01, np.nan, x)}[kind]
    out = io.BytesIO()
    np.savez(out, x=x)
    return out.getvalue()


MODEL_MUTATIONS: tuple[Callable[[bytes, np.random.Generator], bytes], ...] = (bit_flips, truncation, onnx_field_swap)


def judge(argv: list[str], rc: int, stderr: str, before: list[str], after: list[str]) -> str:
    """'' when a case behaved (success with its output written, or one clean error line and nothing
    left behind); else what went wrong."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    if rc == 0:
        return "" if after != before or "-o" not in argv else "success but no output"
    if after != before:
        return f"failed but left {sorted(set(after) - set(before))}"
    if len(lines) != 1 or not lines[0].startswith("dscompile: error:"):
        return f"rc {rc}: {' | '.join(lines)[-300:]}"
    return ""


def make_cases(folder: Path, model: Path, data: Path, rng: np.random.Generator, count: int,
               first: int = 0) -> list[dict]:
    """``count`` mutated cases written under ``folder``: three of four mutate the model (bit flips,
    truncation, protobuf field swaps in turn) and compile it; one of four mutates the .npz and calibrates."""
    out = folder / "out"
    out.mkdir(exist_ok=True)
    src, npz = model.read_bytes(), data.read_bytes()
    cases = []
    for k in range(first, first + count):
        if k % 4 == 3:
            (folder / f"d{k}.npz").write_bytes(npz_mutation(npz, rng))
            argv = ["calibrate", str(model), "--data", f"d{k}.npz", "--method", "minmax", "-q",
                    "-o", str(out / f"c{k}.json")]
            label = f"npz #{k}"
        else:
            mutate = MODEL_MUTATIONS[k % len(MODEL_MUTATIONS)]
            (folder / f"m{k}.onnx").write_bytes(mutate(src, rng))
            argv = ["compile", "--target", "ort-cpu", f"m{k}.onnx", "--verify-samples", "2", "-q",
                    "-o", str(out / f"m{k}.onnx")]
            label = f"{mutate.__name__} #{k}"
        cases.append({"label": label, "argv": argv, "cwd": str(folder), "out": str(out)})
    return cases


def run_cases(cases: list[dict], spec: Path, timeout: float = 120, budget: float = float("inf"),
              on_problem: Callable[[dict, str], None] | None = None) -> tuple[int, dict[str, str]]:
    """Run ``cases`` in fuzz_driver processes; returns (cases run, {label: problem}).

    A case over ``timeout`` seconds is a hang and one that kills the driver a crash: either way the driver
    is restarted after it. No case starts ``budget`` seconds after the first one did.
    """
    spec.write_text(json.dumps(cases))
    start, done, problems, k = None, 0, {}, 0

    def found(idx: int, problem: str) -> None:
        problems[cases[idx]["label"]] = problem
        if on_problem:
            on_problem(cases[idx], problem)

    while k < len(cases) and (start is None or time.monotonic() - start < budget):
        with _Driver(spec, k) as driver:
            current = None
            while True:
                line = driver.readline(timeout if current is not None else 300)  # start-up has its own limit
                if not line:  # None: a hang; "": the driver died
                    if current is None:
                        raise RuntimeError("the fuzz driver did not start")
                    driver.kill()
                    found(current, f"hang (> {timeout:.0f} s)" if line is None else f"crash (exit {driver.rc})")
                    done, k = done + 1, current + 1
                    break
                word, idx, *rest = line.split(" ", 2)
                if word == "start":
                    current = int(idx)
                    start = time.monotonic() if start is None else start  # the budget counts cases, not start-up
                    if time.monotonic() - start >= budget:
                        k = len(cases)
                        break
                    continue
                done, current, k = done + 1, None, int(idx) + 1
                if json.loads(rest[0]):
                    found(int(idx), json.loads(rest[0]))
                if k == len(cases):
                    break
    return done, problems


class _Driver:
    """One fuzz_driver process and its progress lines, read with a time limit (select on the raw pipe)."""

    def __init__(self, spec: Path, first: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.fuzz_driver", str(spec), str(first)],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.buf = b""
        self.rc: int | None = None

    def readline(self, wait: float) -> str | None:
        """The next line; None after ``wait`` seconds without one; "" at the end of the output."""
        deadline = time.monotonic() + wait
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                self.rc = self.proc.wait()
                return ""
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def kill(self) -> None:
        self.proc.kill()
        self.rc = self.proc.wait()

    def __enter__(self) -> _Driver:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        self.proc.stdout.close()
