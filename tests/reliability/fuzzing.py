"""Mutations of real model and data files, and the check each mutated run must pass.

Shared by tests/reliability/test_fuzz.py (a bounded count) and benchmarks/fuzz.py (longer runs).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
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


def run_case(argv: list[str], cwd: Path, out: Path, timeout: float = 120) -> str:
    """Run one mutated case; return '' when it behaved (success with whole output, or one clean error line)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    before = sorted(p.name for p in out.iterdir())
    try:
        r = subprocess.run([sys.executable, "-m", "dscompile", *argv], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"hang (> {timeout:.0f} s)"
    after = sorted(p.name for p in out.iterdir())
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    if r.returncode == 0:
        return "" if after != before or not any(a == "-o" for a in argv) else "success but no output"
    if after != before:
        return f"failed but left {sorted(set(after) - set(before))}"
    if len(lines) != 1 or not lines[0].startswith("dscompile: error:"):
        return f"rc {r.returncode}: {' | '.join(lines)[-300:]}"
    return ""
