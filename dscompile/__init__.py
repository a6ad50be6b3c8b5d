"""dscompile: PyTorch/ONNX models in, verified mixed-precision edge artifacts out.

The stages live in the subpackages ``dscompile.compiler``, ``dscompile.calibration``,
``dscompile.targets`` and ``dscompile.profiles``; ``dscompile.api`` is the public
Python API and ``dscompile.cli`` the command line in front of it.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

# In a source checkout the four stage folders sit beside this one (installed, they
# sit inside it): let them resolve as subpackages so `python -m dscompile` and the
# tests run against the checkout they are in, whatever copy pip installed.
_root = _Path(__file__).resolve().parent.parent
if (_root / "compiler" / "__init__.py").is_file() and str(_root) not in __path__:
    __path__.append(str(_root))
