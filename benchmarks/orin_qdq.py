"""jetson-orin Q/DQ placement against NVIDIA Model Optimizer's ONNX PTQ, in one run.

    python benchmarks/orin_qdq.py [--modelopt-site DIR] [--out DIR]

On the in-repo zoo (trained here: digits CNN, tiny transformer), with the same calibration data
and the same held-out data, it builds:
- ours: ``dscompile --target jetson-orin --calib`` at default settings (DMPQ plans with this
  target's menu and cost model, then the TensorRT placement lowers the plan);
- Model Optimizer: ``modelopt.onnx.quantization.quantize(quantize_mode='int8',
  calibration_method='entropy', calibration_eps=['cpu'], simplify=True, dq_only=True)`` in a
  child process (it patches onnxruntime's quantization module), when nvidia-modelopt imports
  there. It is not a project dependency: install it apart, e.g.
  ``pip install --target DIR --no-deps nvidia-modelopt nvidia-ml-py cppimport onnxconverter-common
  onnxslim polygraphy lief`` and pass ``--modelopt-site DIR``.
Both models run under onnxruntime (CPU) on the held-out samples. Printed per model: fidelity vs
FP32 (top-1 agreement, cosine), task accuracy, Q/DQ node counts, weighted layers left in FP16/FP32,
and the layers where the two placements differ. Goal: our fidelity >= Model Optimizer's with the
same or fewer FP16/FP32 layers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dscompile.compiler.layers import GraphIndex  # noqa: E402
from dscompile.compiler.runtime import ort_session  # noqa: E402
from dscompile.compiler.verify import cosine  # noqa: E402
from dscompile.targets.tensorrt_rules import int8_anchor  # noqa: E402

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CALIB, HELD = 256, 200

_MODELOPT = textwrap.dedent("""
    import sys, numpy as np
    from modelopt.onnx.quantization import quantize
    src, dst, data, name = sys.argv[1:5]
    quantize(src, quantize_mode="int8", calibration_method="entropy", calibration_data={name: np.load(data)},
             calibration_eps=["cpu"], simplify=True, dq_only=True, output_path=dst, log_level="ERROR")
""")


def run_modelopt(src: Path, dst: Path, calib: Path, input_name: str, site: str | None) -> str:
    """Model Optimizer in a child process; '' on success, else why it did not run."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", _MODELOPT, str(src), str(dst), str(calib), input_name],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0 or not dst.exists():
        tail = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()][-1:] or ["no output"]
        return f"Model Optimizer did not run: {tail[0][:200]}"
    return ""


def evaluate(path: Path, reference: onnx.ModelProto, xs: np.ndarray, ys: np.ndarray, input_name: str) -> dict:
    # graph optimizations off on both sides: the reference Q/DQ arithmetic TensorRT runs, not ORT's rewrites
    ref, sess = ort_session(reference, optimize=False), ort_session(str(path), optimize=False)
    agree, coss, correct = 0, [], 0
    for x, y in zip(xs, ys, strict=True):
        feed = {input_name: x[None]}
        r, g = ref.run(None, feed)[0], sess.run(None, feed)[0]
        agree += int(r.argmax() == g.argmax())
        correct += int(g.argmax() == y)
        coss.append(cosine(r, g))
    return {"top1_agreement": agree / len(xs), "cosine": float(np.mean(coss)), "accuracy": correct / len(xs)}


def placement(path: Path) -> dict:
    model = onnx.load(str(path))
    index = GraphIndex.of(model)
    ops = [n.op_type for n in model.graph.node]
    weighted = [n for n in model.graph.node if n.op_type in WEIGHTED]
    int4_codes = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4}
    kind = ["int8" if int8_anchor(n, index) else "int4_weight" if _int4_weight(n, index, int4_codes) else "fp16/fp32"
            for n in weighted]
    return {
        "quantize": ops.count("QuantizeLinear"), "dequantize": ops.count("DequantizeLinear"),
        "weighted": len(weighted), "int8": kind.count("int8"), "int4_weight": kind.count("int4_weight"),
        "high_precision": kind.count("fp16/fp32"),
        "order": [(n.op_type, n.name, k) for n, k in zip(weighted, kind, strict=True)],
    }


def _int4_weight(node: onnx.NodeProto, index: GraphIndex, int4_codes: set[str]) -> bool:
    p = index.producer.get(node.input[1]) if len(node.input) > 1 else None
    return p is not None and p.op_type == "DequantizeLinear" and p.input[0] in int4_codes


def differences(ours: dict, theirs: dict) -> list[str]:
    """Weighted layers paired in graph order (names differ after Model Optimizer's simplify)."""
    if len(ours["order"]) != len(theirs["order"]):
        return [f"graphs differ: {len(ours['order'])} vs {len(theirs['order'])} weighted layers"]
    return [
        f"{name} ({op}): ours {q1}, Model Optimizer {q2}"
        for (op, name, q1), (_, _, q2) in zip(ours["order"], theirs["order"], strict=True) if q1 != q2
    ]


def bench_model(zoo, work: Path, site: str | None) -> dict:
    from dscompile import api

    input_name = onnx.load(str(zoo.onnx)).graph.input[0].name
    calib = work / f"{zoo.name}_calib.npy"
    np.save(calib, zoo.calib[:CALIB])
    ours_dir = work / f"{zoo.name}_orin"
    api.compile(zoo.onnx, target="jetson-orin", output=ours_dir, calib=calib, force=True, verify_samples=16,
                measure_latency=False)
    ours_path = ours_dir / "model.qdq.onnx"
    reference = onnx.load(str(zoo.onnx))
    xs, ys = zoo.test_x[:HELD], zoo.test_y[:HELD]
    row = {"model": zoo.name, "ours": {**evaluate(ours_path, reference, xs, ys, input_name), **placement(ours_path)}}
    mo_path = work / f"{zoo.name}_modelopt.onnx"
    why = run_modelopt(zoo.onnx, mo_path, calib, input_name, site)
    if why:
        row["modelopt"] = {"skipped": why}
        return row
    row["modelopt"] = {**evaluate(mo_path, reference, xs, ys, input_name), **placement(mo_path)}
    row["differences"] = differences(row["ours"], row["modelopt"])
    return row


def show(row: dict) -> None:
    print(f"\n== {row['model']}  (held-out samples: {HELD}, calibration samples: {CALIB})")
    cols = ("top1_agreement", "cosine", "accuracy", "quantize", "dequantize", "int8", "int4_weight", "high_precision")
    print(f"{'':12}" + "".join(f"{c:>16}" for c in cols))
    for who in ("ours", "modelopt"):
        r = row[who]
        if "skipped" in r:
            print(f"{who:12}{r['skipped']}")
            continue
        print(f"{who:12}" + "".join(f"{r[c]:>16.4f}" if isinstance(r[c], float) else f"{r[c]:>16}" for c in cols))
    mo = row["modelopt"]
    if "skipped" not in mo:
        o = row["ours"]
        print(f"ratios ours/modelopt: top-1 agreement {o['top1_agreement'] / max(mo['top1_agreement'], 1e-9):.4f}, "
              f"cosine {o['cosine'] / max(mo['cosine'], 1e-9):.5f}, FP16/FP32 layers "
              f"{o['high_precision']}/{mo['high_precision']}")
        for d in row["differences"] or ["same INT8 layers"]:
            print("  differs:", d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modelopt-site", help="folder where nvidia-modelopt is installed (added to the child's PYTHONPATH)")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from tests.zoo import build_digits, build_sequence

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = [bench_model(z, work, args.modelopt_site) for z in (build_digits(work), build_sequence(work, "transformer"))]
    for row in rows:
        show(row)
    if args.out:
        for row in rows:
            for side in ("ours", "modelopt"):
                row[side].pop("order", None)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
