"""The quantisers dscompile is measured against, each run the way its users run it.

- onnxruntime ``quantize_static`` (QDQ, its defaults) with MinMax, Entropy and
  Percentile calibration, and ``quantize_dynamic``;
- NVIDIA Model Optimizer ONNX PTQ (``modelopt.onnx.quantization.quantize``,
  entropy and max, on the CPU), in a child process because it patches
  onnxruntime's quantisation module globally.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

Feed = dict[str, np.ndarray]


def ort_static(model: Path, out: Path, feeds: list[Feed], method: str) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    calibrate_method=getattr(CalibrationMethod, method))


def ort_dynamic(model: Path, out: Path, feeds: list[Feed]) -> None:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(model), str(out))


_MODELOPT = r"""
import sys, numpy as np
from modelopt.onnx.quantization import quantize
data = dict(np.load(sys.argv[3]))
quantize(sys.argv[1], quantize_mode="int8", calibration_data=data, calibration_method=sys.argv[4],
         calibration_eps=["cpu"], high_precision_dtype="fp32", simplify=True, dq_only=True, output_path=sys.argv[2])
"""


def modelopt_available() -> tuple[bool, str]:
    probe = subprocess.run([sys.executable, "-c", "import modelopt.onnx.quantization"], capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        return False, f"nvidia-modelopt's ONNX path does not import here ({last})"
    return True, ""


def modelopt(model: Path, out: Path, feeds: list[Feed], method: str) -> None:
    """Model Optimizer PTQ in a child process; calibration data stacked along the batch axis."""
    shapes = {tuple((k, v.shape) for k, v in sorted(f.items())) for f in feeds}
    if len(shapes) != 1:
        raise RuntimeError("Model Optimizer takes one stacked calibration array per input; these samples differ in shape")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "calib.npz"
        np.savez(data, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
        r = subprocess.run([sys.executable, "-c", _MODELOPT, str(model), str(out), str(data), method],
                           capture_output=True, text=True, timeout=3600)
    if r.returncode or not out.exists():
        lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
        raise RuntimeError((lines[-1] if lines else "failed")[:200])


def describe() -> dict[str, str]:
    import onnxruntime

    versions = {"onnxruntime": onnxruntime.__version__}
    try:
        from importlib.metadata import version

        versions["nvidia-modelopt"] = version("nvidia-modelopt")
    except Exception:
        versions["nvidia-modelopt"] = "not installed"
    return versions


def dump(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))
