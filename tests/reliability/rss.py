"""Peak RSS of a child process, measured without the parent's memory leaking into the figure.

Linux gives a forked child the parent's resident pages until it execs, and its ru_maxrss keeps that
high-water mark: a benchmark that has imported torch and built its data would report its own size as every
child's floor. So the child is started by a small launcher process (a fresh interpreter), which forks the
measured command and reads its os.wait4 usage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_LAUNCHER = """
import json, os, subprocess, sys
err = open(sys.argv[1], "wb")
proc = subprocess.Popen(sys.argv[3:], cwd=sys.argv[2] or None, stdout=subprocess.DEVNULL, stderr=err)
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}))
"""


def peak_rss(argv: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[int, int, float, str]:
    """(exit code, peak RSS in bytes, seconds, stderr) of ``argv`` run as a grandchild through the launcher."""
    start = time.monotonic()
    with tempfile.NamedTemporaryFile(suffix=".stderr") as err:  # a file, not a pipe: a long stderr cannot block
        r = subprocess.run([sys.executable, "-c", _LAUNCHER, err.name, str(cwd or ""), *argv], env=env,
                           capture_output=True, text=True, check=True)
        text = Path(err.name).read_text(errors="replace")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["rc"], out["maxrss_kb"] * 1024, time.monotonic() - start, text


def dscompile_env() -> dict:
    root = Path(__file__).resolve().parents[2]
    return {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
