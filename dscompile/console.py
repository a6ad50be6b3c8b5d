"""Where messages go: results to stdout, progress and notes to stderr."""

from __future__ import annotations

import logging
import sys

from rich.console import Console

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

log = logging.getLogger("dscompile")


class _ErrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        prefix = {"WARNING": "warning: ", "ERROR": "error: "}.get(record.levelname, "")
        err.print(f"{prefix}{record.getMessage()}", markup=False)


def configure(verbosity: int) -> None:
    """-q -> warnings only, default -> info, -v -> debug."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    log.handlers[:] = [_ErrHandler()]
    log.setLevel(level)
    log.propagate = False


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()
