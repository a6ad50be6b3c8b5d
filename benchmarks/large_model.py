"""Peak memory of compiling a model past protobuf's 2 GB limit (weights in an external-data file).

    python benchmarks/large_model.py [--layers 9] [--width 8192] [--folder /tmp/...]

Builds the model at run time (tests/reliability/large_model.py: MatMul + Tanh layers, 2.25 GiB of float32
weights by default, written one matrix at a time), then runs `dscompile compile --target ort-cpu` on it as a
child process and reads its peak RSS with os.wait4. Prints peak RSS / weight bytes: under 2 means the
compile never held two copies of the weights at once (it reads them from disk into one onnxruntime session
at a time). The folder needs about twice the weight bytes of free disk (model + artifact).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.reliability.large_model import build_large_model, peak_rss_of_compile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--folder", type=Path, help="where to build (default: a temporary folder, removed after)")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="dscompile-large-", dir=args.folder))
    try:
        start = time.monotonic()
        model, weights = build_large_model(folder / "src", args.width, args.layers)
        print(f"model: {args.layers} x MatMul {args.width}x{args.width}, {weights / 2**30:.2f} GiB of weights "
              f"in {model.name}.data (built in {time.monotonic() - start:.0f} s)", flush=True)
        (folder / "out").mkdir()
        rc, peak, seconds, err = peak_rss_of_compile(model, folder / "out" / "model.onnx")
        if rc != 0:
            raise SystemExit(f"compile failed (exit {rc}): {err.strip()[-500:]}")
        written = sum(p.stat().st_size for p in (folder / "out").iterdir())
        print(f"compile --target ort-cpu: exit 0 in {seconds:.0f} s, wrote {written / 2**30:.2f} GiB", flush=True)
        print(f"peak RSS {peak / 2**30:.2f} GiB / weights {weights / 2**30:.2f} GiB = {peak / weights:.3f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
