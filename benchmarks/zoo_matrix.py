"""The FPS matrix of the in-repo zoo and two reference networks, for the README.

    python benchmarks/zoo_matrix.py docs/matrix --force

The zoo models (digits CNN, tiny transformer, GRU) are trained here (tests/zoo.py);
ResNet-50 and MobileNetV2 are the shape-only reference definitions
(tests/reference_nets.py: random weights, which do not change latency).
Cells on this machine are measured with onnxruntime; the rest are estimated.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from dscompile import api  # noqa: E402
from dscompile.commands.profile import show_matrix  # noqa: E402
from dscompile.profiler import ProfileOptions  # noqa: E402
from dscompile.profiles.measure import Settings  # noqa: E402
from tests.reference_nets import onnx_model  # noqa: E402
from tests.zoo import build_digits, build_sequence  # noqa: E402

DEVICES = ("this-cpu", "jetson-agx-orin-64gb", "jetson-orin-nano-8gb", "snapdragon-8-gen2", "snapdragon-8-elite",
           "raspberry-pi-5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = [build_digits(work).onnx, build_sequence(work, "transformer").onnx, build_sequence(work, "gru").onnx]
        for name in ("mobilenet_v2", "resnet50"):
            onnx.save(onnx_model(name), str(work / f"{name}.onnx"))
            paths.append(work / f"{name}.onnx")
        opts = ProfileOptions(devices=DEVICES, precisions=("fp32", "fp16", "int8"), settings=Settings(budget_s=2.0))
        matrix = api.profile(paths, output=args.output, force=args.force, options=opts)
    show_matrix(matrix, show_sources=True)
    print((args.output / "matrix.md").read_text())


if __name__ == "__main__":
    main()
