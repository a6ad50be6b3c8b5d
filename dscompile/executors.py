"""Where batch jobs run: in this process, in local worker processes, or on a Ray cluster.

Every executor runs the same top-level function on plain dicts and returns the
results in job order, so the summary and the matrix are the same either way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from dscompile.errors import InputError, MissingBackendError

log = logging.getLogger("dscompile")
JobFn = Callable[[dict[str, Any]], dict[str, Any]]
RAY_INSTALL = "pip install 'dscompile[ray]' (or pip install ray)"


def parse_executor(text: str) -> tuple[str, str | None]:
    """``local`` or ``ray`` or ``ray:ADDRESS`` -> (kind, address)."""
    kind, _, address = text.partition(":")
    if kind not in ("local", "ray"):
        raise InputError(f"unknown executor {text!r} (use local, ray or ray:ADDRESS)")
    if kind == "local" and address:
        raise InputError(f"executor {text!r}: local takes no address")
    return kind, address or None


def run_all(fn: JobFn, jobs: Sequence[dict[str, Any]], executor: str = "local", workers: int = 1) -> list[dict[str, Any]]:
    kind, address = parse_executor(executor)
    if kind == "ray":
        return _ray(fn, jobs, address, workers)
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    # spawn: workers start clean (no inherited onnxruntime/torch thread pools)
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(fn, jobs))


def _ray(fn: JobFn, jobs: Sequence[dict[str, Any]], address: str | None, workers: int) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise MissingBackendError("Ray (for --executor ray)", RAY_INSTALL) from None
    # Workers of a source checkout need it on their path; an installed dscompile needs nothing.
    root = str(Path(__file__).resolve().parent.parent)
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}}
    started = not ray.is_initialized()
    if started:
        try:
            if address:
                ray.init(address=address, runtime_env=env, log_to_driver=False)
            else:
                log.info(f"starting a local Ray cluster ({workers} CPUs)")
                ray.init(num_cpus=max(1, workers), runtime_env=env, include_dashboard=False, log_to_driver=False)
        except Exception as exc:  # an unreachable cluster: one line, no traceback
            raise InputError(f"cannot connect to Ray at {address or 'a new local cluster'}: {str(exc).splitlines()[0][:200]}") from None
    try:
        task = ray.remote(num_cpus=1)(fn)
        return list(ray.get([task.remote(j) for j in jobs]))
    finally:
        if started:
            ray.shutdown()
