"""A quiet, private, offline place to run onnx2tf in.

onnx2tf writes beside its input, reads a sample-data file from the current
folder (and downloads it when it is missing), prints freely to stdout and
stderr, and ends a failed conversion with ``sys.exit``. These context managers
contain all of that: a private working folder, no network for the duration,
and every byte of output captured so a failure can be explained in one line.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class NetworkBlocked(ConnectionRefusedError):
    """Raised instead of opening a network connection while conversion runs."""


@dataclass
class NetworkLog:
    """Every connection attempt made (and refused) inside ``no_network``."""

    attempts: list[str] = field(default_factory=list)


@contextlib.contextmanager
def no_network() -> Iterator[NetworkLog]:
    """Refuse every outgoing connection and name lookup in this process.

    Conversion must never depend on the network (onnx2tf fetches sample data
    when a file is missing); providing that file makes the fetch unnecessary,
    and this guard makes it impossible. Local (AF_UNIX) sockets still work.
    """
    log = NetworkLog()
    saved = (socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo)

    def refuse(what: str) -> NetworkBlocked:
        log.attempts.append(what)
        return NetworkBlocked(f"dscompile blocks network access during conversion ({what})")

    def connect(sock: socket.socket, address: object) -> None:
        if sock.family == socket.AF_UNIX:
            return saved[0](sock, address)
        raise refuse(f"connect {address!r}")

    def connect_ex(sock: socket.socket, address: object) -> int:
        if sock.family == socket.AF_UNIX:
            return saved[1](sock, address)
        raise refuse(f"connect {address!r}")

    def create_connection(address: object, *args: object, **kwargs: object) -> socket.socket:
        raise refuse(f"connect {address!r}")

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> list:
        raise refuse(f"resolve {host!r}")

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex  # type: ignore[method-assign]
    socket.create_connection, socket.getaddrinfo = create_connection, getaddrinfo  # type: ignore[assignment]
    try:
        yield log
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo = saved  # type: ignore[method-assign]


@contextlib.contextmanager
def private_workdir(prefix: str = "dscompile-tflite-") -> Iterator[Path]:
    """A fresh temporary folder, made the current directory for the duration."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(old)


@dataclass
class Captured:
    """What was written to stdout/stderr (Python and C level) inside ``captured_output``."""

    path: Path
    python: io.StringIO = field(default_factory=io.StringIO)

    def text(self) -> str:
        c_level = self.path.read_text(errors="replace") if self.path.exists() else ""
        return self.python.getvalue() + c_level


@contextlib.contextmanager
def captured_output(folder: Path) -> Iterator[Captured]:
    """Send fds 1 and 2 and ``sys.stdout``/``sys.stderr`` to a file in ``folder``.

    TensorFlow logs from C++ straight to fd 2 and onnx2tf prints to stdout;
    both would corrupt ``--json`` output and the one-line error contract.
    """
    cap = Captured(folder / "converter.log")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved_fds = [os.dup(1), os.dup(2)]
    with open(cap.path, "wb") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(cap.python), contextlib.redirect_stderr(cap.python):
                yield cap
        finally:
            for fd, saved in zip((1, 2), saved_fds, strict=True):
                os.dup2(saved, fd)
                os.close(saved)
