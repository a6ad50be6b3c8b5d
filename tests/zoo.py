"""A small zoo of real models trained at test time (seconds each), so fidelity numbers mean something.

- digits CNN: scikit-learn's digits, conv/bn/relu, accuracy > 0.95.
- transformer encoder: classify whether a token sequence contains more 1s than 2s.
- GRU: the same sequence task read by a recurrent layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dscompile.examples import train_digits_cnn

VOCAB, SEQ = 12, 16


@dataclass
class ZooModel:
    name: str
    module: nn.Module
    accuracy: float
    torchscript: Path
    onnx: Path
    input_shape: str  # for --input-shape
    calib: np.ndarray  # calibration inputs (train split)
    test_x: np.ndarray  # held-out inputs
    test_y: np.ndarray


def sequence_task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB, (n, SEQ)).astype(np.int64)
    y = ((x == 1).sum(1) > (x == 2).sum(1)).astype(np.int64)
    return x, y


class TinyEncoder(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(1, SEQ, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 64, dropout=0.0, batch_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(ids) + self.pos)
        return self.head(h.mean(1))


class TinyGRU(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.gru = nn.GRU(d, d, batch_first=True)
        self.head = nn.Linear(d, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(ids))
        return self.head(out[:, -1])


def _train_sequence(model: nn.Module, steps: int, seed: int) -> float:
    torch.manual_seed(seed)
    x, y = sequence_task(4096, seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(xt), (64,), generator=torch.Generator().manual_seed(seed * 100003 + step))
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
        opt.step()
    model.eval()
    tx, ty = sequence_task(512, seed + 1)
    with torch.no_grad():
        return float((model(torch.from_numpy(tx)).argmax(1).numpy() == ty).mean())


def _save(model: nn.Module, example: torch.Tensor, folder: Path, name: str, input_name: str) -> tuple[Path, Path]:
    import onnx

    from dscompile.compiler.ingest import export_to_onnx, simplify
    from dscompile.compiler.shapes import parse_input_shape

    ts = folder / f"{name}.pt"
    torch.jit.save(torch.jit.trace(model, example, check_trace=False), str(ts))
    dtype = "int64" if example.dtype == torch.int64 else "float32"
    spec = parse_input_shape(f"{input_name}:{'x'.join(map(str, example.shape))}:{dtype}")
    proto, _ = export_to_onnx(model, (spec,), "module", ts)
    path = folder / f"{name}.onnx"
    onnx.save(simplify(proto), str(path))
    return ts, path


def build_digits(folder: Path) -> ZooModel:
    model, acc, data = train_digits_cnn()
    ts, onnx_path = _save(model, torch.from_numpy(data.x_test[:1]), folder, "digits_cnn", "x")
    return ZooModel("digits_cnn", model, acc, ts, onnx_path, "x:1x1x8x8", data.x_train, data.x_test, data.y_test)


def build_sequence(folder: Path, kind: str) -> ZooModel:
    torch.manual_seed(0)
    model = TinyEncoder() if kind == "transformer" else TinyGRU()
    acc = _train_sequence(model, 400 if kind == "transformer" else 300, seed=0)
    calib, _ = sequence_task(256, 7)
    tx, ty = sequence_task(256, 1)
    ts, onnx_path = _save(model, torch.from_numpy(tx[:1]), folder, kind, "ids")
    return ZooModel(kind, model, acc, ts, onnx_path, f"ids:1x{SEQ}:int64", calib, tx, ty)
