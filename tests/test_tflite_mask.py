"""Snapdragon target on a transformer with a padding mask: int8 must not spend its grid on the mask.

BERT-style encoders add ``(1 - mask) * -10000`` (or the float minimum) to the attention scores of
padding tokens. A min/max range of that sum is [-10000, max score]: on an int8 grid that is 39 per
step, every real score rounds to the same code and the attention turns uniform (all-MiniLM-L6-v2,
both our int8 and ai-edge-quantizer's: pooled cosine below 0.4). The target cuts a SOFTMAX input's
range SOFTMAX_SPAN below the smallest row maximum seen on the calibration samples.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx2tf")

from dscompile.calibration.collect import calibrate  # noqa: E402
from dscompile.compiler.ingest import export_to_onnx, ingest, simplify  # noqa: E402
from dscompile.compiler.shapes import parse_input_shape  # noqa: E402
from dscompile.planning import calibration_tensors  # noqa: E402
from dscompile.profiles.runners import OrtRunner  # noqa: E402
from dscompile.targets.base import BuildOptions, get_target  # noqa: E402

VOCAB, SEQ, D = 12, 16, 32
DEVICE = "snapdragon-8-gen3"


class MaskedEncoder(nn.Module):
    """One attention block with a BERT-style additive mask, mask-pooled, two classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(torch.randn(1, SEQ, D) * 0.1)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 2)

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos
        scores = self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(D)
        scores = scores + (1.0 - mask[:, None, :].float()) * -10000.0
        return self.norm(x + self.o(torch.softmax(scores, -1) @ self.v(x)))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.hidden(ids, mask)


def padded_task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids (0 = padding), mask, and whether the real tokens hold more 1s than 2s."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (n, SEQ)).astype(np.int64)
    lengths = rng.integers(4, SEQ + 1, n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    ids *= mask
    return ids, mask, ((ids == 1).sum(1) > (ids == 2).sum(1)).astype(np.int64)


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    torch.manual_seed(0)
    model = MaskedEncoder()
    ids, mask, y = (torch.from_numpy(a) for a in padded_task(4096, 0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(300):
        i = torch.randint(0, len(ids), (64,), generator=torch.Generator().manual_seed(step))
        h = model.hidden(ids[i], mask[i])
        m = mask[i, :, None].float()
        opt.zero_grad()
        nn.functional.cross_entropy(model.head((h * m).sum(1) / m.sum(1)), y[i]).backward()
        opt.step()
    model.eval()
    specs = (parse_input_shape(f"ids:1x{SEQ}:int64"), parse_input_shape(f"mask:1x{SEQ}:int64"))
    folder = tmp_path_factory.mktemp("masked")
    proto, _ = export_to_onnx(model, specs, "module", folder / "masked.pt")
    import onnx

    onnx.save(simplify(proto), str(folder / "masked.onnx"))
    graph = ingest(folder / "masked.onnx").graph
    ci, cm, _ = padded_task(64, 1)
    calib = [{"ids": ci[j:j + 1], "mask": cm[j:j + 1]} for j in range(len(ci))]
    ti, tm, _ = padded_task(64, 2)
    test = [{"ids": ti[j:j + 1], "mask": tm[j:j + 1]} for j in range(len(ti))]
    table = calibrate(graph.model, calib, model_sha256=graph.sha256, data_sha256="masked",
                      tensors=calibration_tensors(graph), progress=False)
    return graph, table, calib, test


def pooled_cosine(graph, runner, test) -> float:
    ref = OrtRunner(graph.model)
    cos = []
    for f in test:
        m = f["mask"][0].astype(bool)
        a, b = ref.run(f)[0][0][m].mean(0), runner.run(f)[0][0][m].mean(0)
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return float(np.mean(cos))


def test_int8_attention_with_padding_mask(masked, tmp_path):
    graph, table, calib, test = masked
    target = get_target("snapdragon")
    art = target.lower(graph, target.default_plan(graph, table), table, tmp_path,
                       BuildOptions(device=DEVICE, samples=tuple(calib)))
    cut = art.notes["tflite"]["softmax_input_floors"]["tensors"]
    assert cut and all(v["range"][0] < -9000 < -30 < v["cut_to"][0] for v in cut.values()), cut
    assert art.notes["tflite"]["op_precisions"].get("int8", 0) > 10
    assert pooled_cosine(graph, target.runner(art), test) > 0.98


def test_int16x8_attention_with_padding_mask_runs(masked, tmp_path):
    """int16x8 everywhere: LiteRT's int16 ADD aborts the process on broadcasting operands (the mask
    added to the scores), so those ADDs stay float and the model runs and holds."""
    from dataclasses import replace

    from dscompile.compiler.capabilities import INT8, INT16X8

    graph, table, calib, test = masked
    target = get_target("snapdragon")
    base = target.default_plan(graph, table)
    plan = replace(base, layers=tuple(replace(lp, precision=INT16X8) if lp.precision == INT8 else lp for lp in base.layers))
    art = target.lower(graph, plan, table, tmp_path, BuildOptions(device=DEVICE, samples=tuple(calib)))
    kept = [k for k in art.notes["tflite"]["kept_float_no_range"] if k.get("why", "").startswith("LiteRT's int16 ADD")]
    assert kept and all(k["op"] == "ADD" for k in kept)
    assert art.notes["tflite"]["op_precisions"].get("int16x8", 0) > 10
    import subprocess
    import sys

    # in a child process: on a failure the old build took the test runner down with SIGABRT
    code = ("import numpy as np, sys\nfrom ai_edge_litert.interpreter import Interpreter\n"
            "r = Interpreter(model_path=sys.argv[1]).get_signature_runner()\n"
            "r(**{k: np.zeros(v['shape'], v['dtype']) for k, v in r.get_input_details().items()})\n")
    assert subprocess.run([sys.executable, "-c", code, str(art.primary_path)], capture_output=True).returncode == 0
    assert pooled_cosine(graph, target.runner(art), test) > 0.98


def test_dmpq_emulates_the_softmax_floors(masked):
    """DMPQ's emulator quantizes the mask's sum on the ranges the build uses (cut at the softmax
    floor), not the table's [-10000, x]: the scores + mask Add costs little at int8. Before, its
    int8 sensitivity was that of a uniform attention (all-MiniLM-L6-v2: DMPQ kept 12 such Adds fp32)."""
    from dataclasses import replace

    from dscompile.compiler.capabilities import INT8
    from dscompile.compiler.dmpq import PlanOptions, make_plan
    from dscompile.compiler.normalize import prepared

    graph, table, calib, _ = masked
    g = prepared(graph)
    caps = get_target("snapdragon").capabilities(g, DEVICE)
    assert caps.activations.softmax_span > 0
    softmax_in = {n.input[0] for n in g.model.graph.node if n.op_type == "Softmax"}
    options = PlanOptions(sensitivity_samples=8, show_progress=False)

    def mask_add(c):
        plan = make_plan(g, c, table, calib[:8], options)
        nodes = {n.name: n for n in g.model.graph.node}
        return next(lp for lp in plan.layers if lp.op == "Add" and softmax_in & set(nodes[lp.nodes[-1]].output))

    floored = mask_add(caps)
    table_only = mask_add(replace(caps, activations=replace(caps.activations, softmax_span=0.0)))
    lows = [r["min"] for r in floored.activations["ranges"].values()]
    assert min(r["min"] for r in table_only.activations["ranges"].values()) < -9000
    assert all(lo > -200 for lo in lows), floored.activations["ranges"]
    assert floored.sensitivity[INT8] < 0.1 * table_only.sensitivity[INT8], (floored.sensitivity, table_only.sensitivity)
