"""Exception types shared by every stage.

A leaf module: it imports nothing of the project, so every stage may use it
without breaking the one-way import rule.
"""

from __future__ import annotations


class DscompileError(Exception):
    """A problem with the user's input or environment: one line, no traceback."""


class InputError(DscompileError):
    """A model, data file, plan or option the user gave is unusable."""


class OutputError(DscompileError):
    """An output location that exists, cannot be written, or filled up."""


class MissingBackendError(DscompileError):
    """An optional runtime (TFLite stack, TensorRT) is not installed."""

    def __init__(self, what: str, install: str) -> None:
        super().__init__(f"{what} is not installed; install it with: {install}")
        self.install = install


class VerificationError(DscompileError):
    """An artifact or export disagrees with its source beyond tolerance."""
