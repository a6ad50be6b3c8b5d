"""Atomic output: every file and folder appears whole or not at all.

A leaf module (imports nothing of the project but errors) used by every
stage that writes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dscompile.errors import OutputError

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_writable(path: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing output without ``force`` and an unwritable folder, before any work."""
    out = Path(path)
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists (use --force to overwrite)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: folder {parent} is not writable")
    return out


def _io_error(path: Path, exc: OSError) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"{path}: no space left on device")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{path}: cannot write ({exc.strerror})")
    return OutputError(f"{path}: cannot write ({exc})")


def staging_root(out: Path) -> Path:
    """Where to build ``out`` before it is renamed into place.

    The system temp folder when it is on the destination's file system (so a run
    killed outright leaves nothing in the output folder), else the destination
    folder itself (a rename across file systems would not be atomic).
    """
    parent = out.parent if str(out.parent) else Path(".")
    tmp = Path(tempfile.gettempdir())
    try:
        if tmp.stat().st_dev == parent.stat().st_dev and os.access(tmp, os.W_OK):
            return tmp
    except OSError:
        pass
    return parent


def make_stage(out: Path) -> Path:
    """A new empty staging folder for ``out`` (see ``staging_root``)."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".stage", dir=staging_root(out)))
    except OSError as exc:
        raise _io_error(out, exc) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path; rename it into place on success, remove it on failure."""
    out = Path(path)
    tmp = staging_root(out) / f".{out.name}.{os.getpid()}.{id(out):x}.tmp"
    try:
        yield tmp
        if out.exists() and not force:
            raise OutputError(f"{out}: already exists (use --force to overwrite)")
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:
        raise _io_error(out, exc) from exc
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; it replaces ``path`` on success."""
    out = Path(path)
    tmp = make_stage(out)
    try:
        yield tmp
        if out.exists() and not force:
            raise OutputError(f"{out}: already exists (use --force to overwrite)")
        replace_dir(tmp, out)
    except OSError as exc:
        raise _io_error(out, exc) from exc
    finally:
        _remove(tmp)


def replace_dir(src: Path, out: Path) -> None:
    """Move folder ``src`` to ``out``, replacing an old ``out`` with one rename in view."""
    if out.exists():
        old = staging_root(out) / f".{out.name}.{os.getpid()}.old"
        os.replace(out, old)
        os.replace(src, out)
        _remove(old)
    else:
        os.replace(src, out)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def write_bytes(path: str | os.PathLike, data: bytes, force: bool = False) -> Path:
    with atomic_path(path, force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, force: bool = False) -> Path:
    return write_bytes(path, text.encode(), force)


def write_json(path: str | os.PathLike, obj: Any, force: bool = False) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", force)
