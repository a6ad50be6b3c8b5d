"""Runs fuzz cases through the real CLI inside one Python process (no interpreter start-up per case).

    python -m tests.reliability.fuzz_driver CASES.json START

CASES.json is a list of {"argv": [...], "cwd": "...", "out": "..."}. For each case from START on, this
prints a line ``start K`` before the case and ``done K <problem as JSON>`` after it on the original stdout
(the command's own stdout and stderr are captured at the file-descriptor level, so C++ output is caught
too). A case that hangs or kills the process shows up in the parent (fuzzing.run_cases) as a ``start``
with no ``done``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from tests.reliability.fuzzing import judge


def _run(argv: list[str], cwd: Path) -> tuple[object, str]:
    """(exit code, captured stderr) of ``dscompile ARGV`` run in this process."""
    from dscompile.cli import main

    here = os.getcwd()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as err, open(os.devnull, "wb") as null:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(null.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            os.chdir(cwd)
            main(argv)
            rc: object = 0
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - anything escaping main() is itself the finding
            rc = f"escaped main(): {type(exc).__name__}: {exc}"
        finally:
            os.chdir(here)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        err.seek(0)
        return rc, err.read().decode(errors="replace")


def main(spec: str, start: int) -> None:
    import dscompile.cli  # noqa: F401 - imported before the first case, so its time limit is the case's alone

    cases = json.loads(Path(spec).read_text())
    report = os.fdopen(os.dup(1), "w", buffering=1)
    for k in range(start, len(cases)):
        case = cases[k]
        out = Path(case["out"])
        report.write(f"start {k}\n")
        before = sorted(p.name for p in out.iterdir())
        rc, err = _run(case["argv"], Path(case["cwd"]))
        after = sorted(p.name for p in out.iterdir())
        problem = f"rc {rc}" if isinstance(rc, str) else judge(case["argv"], rc, err, before, after)
        report.write(f"done {k} {json.dumps(problem)}\n")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
