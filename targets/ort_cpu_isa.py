"""Which int8 weight grid onnxruntime's x86 kernels compute exactly on the deployment CPU.

onnxruntime's x86 integer kernels multiply uint8 activations by int8 weights with
``vpmaddubsw``, which adds two products into a saturating int16 unless the CPU has VNNI
(``vpdpbusd`` accumulates in int32). With full-range codes, 255 x 127 x 2 overflows int16, so on
AVX2/AVX-512 CPUs without VNNI a MatMul or Conv silently clips (8 % error on a random 64x16 MatMul
measured on an AMD EPYC Zen 3). onnxruntime's own quantizer has ``reduce_range`` for this: 7-bit
weights (-63..63), whose pair sums stay under 32767. Arm's kernels widen before they add, and a
VNNI CPU accumulates in int32. ``compiler/qdq.py`` and ``lower_qdq`` take the bits per layer; the
plan says which (``ort_cpu_saturation.py`` chooses them by measurement on this CPU).
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

# /proc/cpuinfo flags of an int32-accumulating int8 dot product on x86
_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}
REDUCED_BITS = 7


@cache
def _this_cpu_bits() -> int:
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return 8
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume the worst case of x86 (no VNNI)
        return REDUCED_BITS
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return 8 if _VNNI_FLAGS & set(flags) else REDUCED_BITS


def int8_weight_bits(this_cpu: bool) -> int:
    """Bits of int8 weight codes onnxruntime computes without saturation on the deployment CPU: 7 on
    this machine if it is x86 without VNNI, else 8 (named profiles: a Zen 4 with AVX-512 VNNI, a
    Cortex-A76)."""
    return _this_cpu_bits() if this_cpu else 8


def weight_bits_note(bits: int, reduced: dict[str, int] | None = None) -> str | None:
    """The report's note where full-range int8 weights may saturate: which layers the plan gave
    fewer bits (``ort_cpu_saturation.py`` measures each int8 layer both ways on this CPU and keeps
    7 bits only where they are closer to FP32; 7 everywhere cost more than saturation on YOLOv8n,
    PP-OCRv4 and MiniLM)."""
    if reduced:
        names = sorted(reduced)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return (f"{len(names)} int8 layer(s) with {min(reduced.values())}-bit weights ({shown}): this CPU's "
                "uint8 x int8 kernels add two products into a saturating int16 (no VNNI), and those layers "
                "measured closer to FP32 with fewer bits; the rest keep 8")
    if bits == 8:
        return None
    return ("this x86 CPU has no VNNI: onnxruntime's uint8 x int8 kernels add two products into a saturating "
            "int16; every int8 layer measured closer to FP32 with 8-bit weights than with 7 on the calibration "
            "samples (or the plan was not measured on this CPU), and the held-out fidelity above includes it")
