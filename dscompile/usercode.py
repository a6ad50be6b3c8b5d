"""``MODULE:FUNCTION`` references to the user's own Python code (data generators, fidelity metrics).

Importing a module runs its code, so every caller asks for ``--trust-code`` before this is reached.
The current folder is importable, as it is for ``python -m``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from dscompile.errors import InputError


def import_callable(ref: str, option: str) -> Callable:
    """The callable ``ref`` names; any failure is one InputError line naming ``option``."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"{option} {ref}: expected MODULE:FUNCTION")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise InputError(f"{option} {ref}: cannot import {module_name} ({exc})") from None
    except AttributeError:
        raise InputError(f"{option} {ref}: module {module_name} has no {attr}") from None
    except Exception as exc:  # importing user code may raise anything
        raise InputError(f"{option} {ref}: importing {module_name} raised {type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise InputError(f"{option} {ref}: {attr} is not callable")
    return fn
