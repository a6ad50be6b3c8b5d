"""Benchmark: what distillation buys over round-to-nearest, measured in one run.

    python benchmarks/distill.py                 # digits CNN, tiny transformer, MTCNN ONet
    python benchmarks/distill.py --quick         # fewer steps
    python benchmarks/distill.py --resnet18      # also: time `dscompile build --distill` on a ResNet-18 shape
    flock /work/bench.lock python benchmarks/distill.py --only-resnet18   # only that timing

Models: the digits CNN and the tiny transformer (trained here, scored on their
held-out test splits) and MTCNN's ONet, pretrained weights from the
facenet-pytorch wheel (`pip install --no-deps facenet-pytorch==2.6.0`; scored by
agreement with its FP32 outputs on 48x48 crops of scikit-learn's sample photos).
Plans: W8A8 (every Conv/Gemm/MatMul int8, built by the ort-cpu target and run
with onnxruntime), W4 on ort-cpu (Conv int8, Gemm/MatMul int4 blocks:
MatMulNBits), and W4A8 emulated (int4 per-channel weights, int8 activations: a
grid no ort-cpu kernel runs, measured on the fake-quantised simulation that
TensorRT/Snapdragon-style W4A8 would compute). Each plan is built four ways:
round-to-nearest, + bias correction, + layer-wise reconstruction, + e2e (torch
sources). Ratios are against round-to-nearest in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dscompile.compiler.distill import Distiller, DistillOptions, model_with_rtn  # noqa: E402
from dscompile.compiler.distill_capture import output_error, run_outputs, student_model  # noqa: E402
from dscompile.compiler.distill_state import current_entries, planned_layers  # noqa: E402
from dscompile.compiler.ingest import IngestOptions, ingest  # noqa: E402
from dscompile.compiler.normalize import normalize  # noqa: E402
from dscompile.compiler.shapes import parse_input_shape  # noqa: E402
from dscompile.distilling import target_run_plan  # noqa: E402
from dscompile.targets.base import BuildOptions, get_target  # noqa: E402
from tests.distill_support import feeds_of, uniform_plan  # noqa: E402

RESNET_SAMPLES = 400  # as many as the default --distill-samples reads (256 + a quarter held out), plus verification
PLANS = {
    "W8A8": ({"Conv": "int8", "Gemm": "int8", "MatMul": "int8"}, None, "artifact"),
    "W4 ort-cpu": ({"Conv": "int8", "Gemm": "int4_weight", "MatMul": "int4_weight"}, None, "artifact"),
    "W4A8 emulated": ({"Conv": "int8", "Gemm": "int8", "MatMul": "int8"}, 4, "sim"),
}


def build_models(work: Path) -> list[dict]:
    from tests.zoo import build_digits, build_sequence

    models = []
    d = build_digits(work)
    models.append({"name": "digits CNN", "path": d.torchscript, "shape": d.input_shape, "input": "x",
                   "calib": d.calib[:384], "test": d.test_x, "labels": d.test_y, "metric": "accuracy"})
    t = build_sequence(work, "transformer")
    from tests.zoo import sequence_task

    calib, _ = sequence_task(384, 7)
    # its TorchScript does not re-export (unknown-rank transpose): the zoo's ONNX export + the module as teacher
    models.append({"name": "transformer", "path": t.onnx, "teacher": t.module, "shape": t.input_shape, "input": "ids",
                   "calib": calib, "test": t.test_x, "labels": t.test_y, "metric": "accuracy"})
    onet = build_onet(work)
    if onet:
        models.append(onet)
    return models


def build_onet(work: Path) -> dict | None:
    """MTCNN's ONet with the pretrained weights the facenet-pytorch wheel ships (no download)."""
    import importlib.util

    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None:
        print("(skipping ONet: pip install --no-deps facenet-pytorch==2.6.0)")
        return None
    weights = Path(next(iter(spec.submodule_search_locations))) / "data" / "onet.pt"
    from torch import nn

    class ONet(nn.Module):  # facenet_pytorch/models/mtcnn.py, without its torchvision imports
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
            self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
            self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
            self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.pool3(self.prelu3(self.conv3(x)))
            x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).contiguous()
            x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
            return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), 1)

    net = ONet()
    net.load_state_dict(torch.load(weights, weights_only=True))
    net.eval()
    crops = photo_crops(640, 48)
    path = work / "onet.pt"
    torch.jit.save(torch.jit.trace(net, torch.from_numpy(crops[:1])), str(path))
    return {"name": "MTCNN ONet (pretrained)", "path": path, "shape": "x:1x3x48x48", "input": "x",
            "calib": crops[:448], "test": crops[448:], "labels": None, "metric": "agreement"}


def photo_crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Random square crops of scikit-learn's two sample photos, resized, scaled as MTCNN feeds them."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    images = load_sample_images().images
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img = images[i % len(images)]
        side = int(rng.integers(size, min(img.shape[:2]) // 2))
        y, x = int(rng.integers(0, img.shape[0] - side)), int(rng.integers(0, img.shape[1] - side))
        crop = Image.fromarray(img[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
        out[i] = (np.asarray(crop, np.float32).transpose(2, 0, 1) - 127.5) * 0.0078125
    return out


def evaluate(graph, plan, kind: str, feeds, distilled: bool) -> list[list[np.ndarray]]:
    if kind == "artifact":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            target = get_target("ort-cpu")
            art = target.lower(graph, plan, None, Path(tmp), BuildOptions(threads=1))
            runner = target.runner(art, 1)
            return [runner.run(f) for f in feeds]
    model = normalize(graph.model)
    layers, _ = planned_layers(model, plan)
    sim = student_model(model if distilled else model_with_rtn(model, layers), {}, current_entries(layers))
    return run_outputs(sim, feeds, 1)


def score(m: dict, outs, ref) -> tuple[float, float]:
    """(task metric, normalised output error vs FP32)."""
    err = output_error(ref, outs)["nmse"]
    if m["labels"] is not None:
        scores = np.concatenate([o[0] for o in outs])
        return float((scores.argmax(-1) == m["labels"]).mean()), err
    prob = np.concatenate([o[-1] for o in outs]).argmax(-1)  # ONet: face / no face
    return float((prob == np.concatenate([r[-1] for r in ref]).argmax(-1)).mean()), err


def run_model(m: dict, steps: int | None, e2e_steps: int, time_s: float | None = None) -> list[tuple]:
    ing = ingest(m["path"], IngestOptions(input_shapes=(parse_input_shape(m["shape"]),)))
    graph, teacher = ing.graph, m.get("teacher", ing.torch_module)
    calib = feeds_of(m["calib"], m["input"])
    test = feeds_of(m["test"], m["input"])
    ref = run_outputs(graph.model, test, 1)
    fp32_metric, _ = score(m, ref, ref)
    rows = [(m["name"], "FP32", "-", fp32_metric, 0.0, 0.0)]
    run_plan = target_run_plan(get_target("ort-cpu"), None, "this-cpu", 1, 0)
    for plan_name, (precisions, bits, kind) in PLANS.items():
        plan = uniform_plan(graph, precisions, calib, weight_bits=bits)
        base_metric, base_err = score(m, evaluate(graph, plan, kind, test, False), ref)
        rows.append((m["name"], plan_name, "round-to-nearest", base_metric, base_err, 0.0))
        methods = [("+ bias correction", DistillOptions(mode="bias")),
                   ("+ reconstruction", DistillOptions(mode="layer", steps=steps, time_s=time_s)),
                   ("+ e2e (KD/QAT)", DistillOptions(mode="e2e", steps=e2e_steps, max_samples=128, time_s=time_s))]
        for label, opts in methods:
            t0 = time.perf_counter()
            res = Distiller(graph, calib, opts, teacher, None, run_plan if kind == "artifact" else None)(plan)
            took = time.perf_counter() - t0
            metric, err = score(m, evaluate(res.graph, res.plan, kind, test, not res.fell_back), ref)
            label += " (fell back)" if res.fell_back else ""
            rows.append((m["name"], plan_name, label, metric, err, took))
        print_rows(rows[-4:] if plan_name != next(iter(PLANS)) else rows, header=plan_name == next(iter(PLANS)))
    return rows


def print_rows(rows: list[tuple], header: bool = False) -> None:
    if header:
        print(f"{'model':<24} {'plan':<14} {'method':<34} {'metric':>8} {'nmse vs fp32':>13} {'gain':>8} {'time s':>7}")
    base = None
    for name, plan, method, metric, err, took in rows:
        if method == "round-to-nearest":
            base = err
        gain = f"{base / err:7.2f}x" if base and err and method != "round-to-nearest" else ""
        print(f"{name:<24} {plan:<14} {method:<34} {metric:8.4f} {err:13.3g} {gain:>8} {took:7.1f}", flush=True)


def resnet18_timing(work: Path) -> None:
    """`dscompile build --distill` with the default budget on a ResNet-18-shaped model, timed end to end
    through the CLI (random weights and inputs: time only, not fidelity)."""
    from torch import nn

    def block(cin, cout, stride):
        layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers)

    class ResNet18(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            chans = [(64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
                     (256, 512, 2), (512, 512, 1)]
            self.blocks = nn.ModuleList(block(*c) for c in chans)
            self.down = nn.ModuleList(nn.Conv2d(a, b, 1, s, bias=False) if s != 1 or a != b else nn.Identity()
                                      for a, b, s in chans)
            self.fc = nn.Linear(512, 1000)

        def forward(self, x):
            x = self.stem(x)
            for b, d in zip(self.blocks, self.down, strict=True):
                x = torch.relu(b(x) + d(x))
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    path = work / "resnet18.pt"
    if not path.exists():
        torch.jit.save(torch.jit.trace(ResNet18().eval(), torch.randn(1, 3, 224, 224)), str(path))
    shape = "x:1x3x224x224"
    graph = ingest(path, IngestOptions(input_shapes=(parse_input_shape(shape),))).graph
    samples = np.random.default_rng(0).standard_normal((RESNET_SAMPLES, 3, 224, 224)).astype(np.float32)
    np.savez(work / "resnet18_calib.npz", x=samples)
    uniform_plan(graph, PLANS["W8A8"][0], feeds_of(samples[:16], "x")).save(work / "resnet18_plan.json", force=True)
    out = work / "resnet18_q.onnx"
    cmd = [sys.executable, "-m", "dscompile", "build", str(path), "--input-shape", shape, "--plan",
           str(work / "resnet18_plan.json"), "--calib", str(work / "resnet18_calib.npz"), "--distill",
           "-o", str(out), "--force", "--json"]
    load, cpu0 = os.getloadavg(), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    took = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    if r.returncode != 0:
        raise SystemExit(f"dscompile build failed:\n{r.stderr}")
    dist = json.loads(r.stdout)["distillation"]
    print(f"ResNet-18 shape (random weights and inputs: time only), `dscompile build --plan W8A8 --distill` with "
          f"default budget, {RESNET_SAMPLES} samples given, {os.cpu_count()} cores, load average before "
          f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, after {os.getloadavg()[0]:.2f}:")
    print(f"  wall {took:.0f} s end to end (ingest, calibration, capture, learning, build, verify; goal < 600 s), "
          f"CPU {cpu:.0f} s; "
          f"distillation stage {dist['time_s']:.0f} s ({len(dist['layers'])} layers on {dist['samples']['train']} "
          f"samples, {dist['learning_s']:.0f} s in layers)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--resnet18", action="store_true", help="also time the defaults on a ResNet-18 shape")
    ap.add_argument("--only-resnet18", action="store_true", help="only the ResNet-18 timing (run it under flock)")
    ap.add_argument("--steps", type=int, help="steps per layer (default 1000, --quick 200)")
    ap.add_argument("--e2e-steps", type=int, help="e2e steps (default 400, --quick 60)")
    ap.add_argument("--time-budget", type=float, help="seconds of learning per run (default: none, steps decide)")
    ap.add_argument("--models", help="comma-separated name parts to run (default: all), e.g. digits,onet")
    ap.add_argument("--work", type=Path, default=ROOT / ".bench_cache" / "distill")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    steps, e2e_steps = (200, 60) if args.quick else (None, 400)
    steps, e2e_steps = args.steps or steps, args.e2e_steps or e2e_steps
    # not a timed run: by default learning stops at its steps, not at the wall-time budget (a busy
    # machine would otherwise cut it short); --time-budget restores the budget
    time_s = args.time_budget or 1e9
    print(f"distillation benchmark: onnxruntime CPU, torch {torch.__version__}; "
          f"steps per layer {steps or 'default (1000)'}, e2e steps {e2e_steps}, "
          f"time budget {'none' if time_s >= 1e9 else f'{time_s:.0f} s'}")
    if args.only_resnet18:
        return resnet18_timing(args.work)
    for m in build_models(args.work):
        if not args.models or any(k.lower() in m["name"].lower() for k in args.models.split(",")):
            run_model(m, steps, e2e_steps, time_s)
    if args.resnet18:
        resnet18_timing(args.work)


if __name__ == "__main__":
    main()
