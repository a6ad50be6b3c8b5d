"""DMPQ (dscompile, default settings) against onnxruntime's and Model Optimizer's quantisers, in one run.

Every tool gets the same calibration samples; every result is checked on the
same held-out samples (never used to calibrate), with onnxruntime's CPU
provider on this machine, one thread, against the FP32 model in the same run.

    python benchmarks/dmpq_vs_peers.py [--cache DIR] [--only NAME] [--tools A,B] [--out results.json]

A model whose ``meta["goals"]`` name a budget and fidelity floor gets a dscompile
row compiled with each (all-MiniLM-L6-v2: the issue's "1/6 of FP32 size at
cosine >= 0.99", once with the output's cosine, once with the pooled sentence
embedding's cosine as the repair loop's own metric, bench_models.pooled_cosine).

Columns: task fidelity vs FP32 (top-1 agreement for classifiers; mean IoU of
the FP32 top-10 anchors' boxes plus their class agreement for the detector;
exact string match of the CTC-decoded text for the OCR recogniser; cosine and
nearest-neighbour agreement of pooled embeddings for the encoder), output
cosine, size and p50 latency as ratios of FP32, and the tool's wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
from bench_models import BenchModel, real_models, zoo_models  # noqa: E402

Feed = dict[str, np.ndarray]


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(sess, feeds: list[Feed]) -> list[list[np.ndarray]]:
    names = {i.name for i in sess.get_inputs()}
    return [sess.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds]


def _p50(sess, feed: Feed, runs: int = 30) -> float:
    names = {i.name for i in sess.get_inputs()}
    f = {k: v for k, v in feed.items() if k in names}
    for _ in range(3):
        sess.run(None, f)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, f)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def latency_ratio(candidate, reference, feed: Feed, rounds: int = 5, runs: int = 10) -> float:
    """Candidate / reference p50, measured in alternating rounds so a busy machine's drift cancels."""
    ratios = [_p50(candidate, feed, runs) / _p50(reference, feed, runs) for _ in range(rounds)]
    return float(np.median(ratios))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def _ctc(probs: np.ndarray) -> tuple[int, ...]:
    ids = probs[0].argmax(-1)
    return tuple(int(c) for i, c in enumerate(ids) if c != 0 and (i == 0 or c != ids[i - 1]))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of [N, 4] (cx, cy, w, h) boxes, pairwise by row."""
    def corners(x):
        return x[:, 0] - x[:, 2] / 2, x[:, 1] - x[:, 3] / 2, x[:, 0] + x[:, 2] / 2, x[:, 1] + x[:, 3] / 2
    ax0, ay0, ax1, ay1 = corners(a)
    bx0, by0, bx1, by1 = corners(b)
    inter = np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0, None) * np.clip(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0, None)
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / np.maximum(union, 1e-9)


def fidelity(kind: str, ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> dict[str, float]:
    cos = float(np.mean([_cos(r[0], g[0]) for r, g in zip(ref, got, strict=True)]))
    if kind == "classifier":
        agree = np.mean([r[0].argmax(-1).ravel()[0] == g[0].argmax(-1).ravel()[0] for r, g in zip(ref, got, strict=True)])
        return {"task": float(agree), "task_name": "top-1 agreement", "cosine": cos}
    if kind == "detector":
        ious, same = [], []
        for r, g in zip(ref, got, strict=True):
            rr, gg = r[0][0].T, g[0][0].T  # [anchors, 4 + classes]
            top = np.argsort(-rr[:, 4:].max(1))[:10]
            ious.extend(_iou(rr[top, :4], gg[top, :4]))
            same.extend(rr[top, 4:].argmax(1) == gg[top, 4:].argmax(1))
        return {"task": float(np.mean(ious)), "task_name": "top-10 box IoU", "class_agreement": float(np.mean(same)), "cosine": cos}
    if kind == "ocr":
        match = np.mean([_ctc(r[0]) == _ctc(g[0]) for r, g in zip(ref, got, strict=True)])
        return {"task": float(match), "task_name": "text exact match", "cosine": cos}
    emb_r = np.stack([r[0][0].mean(0) for r in ref])
    emb_g = np.stack([g[0][0].mean(0) for g in got])
    pooled = float(np.mean([_cos(a, b) for a, b in zip(emb_r, emb_g, strict=True)]))

    def nn(e):
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)
    return {"task": pooled, "task_name": "pooled-embedding cosine", "nn_agreement": float(np.mean(nn(emb_r) == nn(emb_g))), "cosine": cos}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def ours(model: BenchModel, out: Path, calib: list[Feed], goal: dict | None = None) -> None:
    """dscompile at its defaults, or (``goal``) with a size budget, fidelity floor and distillation."""
    from dataclasses import replace

    from dscompile import api
    from dscompile.compiler.allocate import parse_budget
    from dscompile.compiler.distill import DistillOptions
    from dscompile.compiler.ingest import IngestOptions
    from dscompile.compiler.repair import parse_goal
    from dscompile.compiler.shapes import parse_input_shape
    from dscompile.pipeline import CompileOptions, PlanSettings

    data = out.parent / (out.stem + "_calib")
    data.mkdir()
    for i, f in enumerate(calib):
        np.savez(data / f"{i:05d}.npz", **f)
    ing = IngestOptions(input_shapes=tuple(parse_input_shape(s, i) for i, s in enumerate(model.input_shapes)))
    opts = CompileOptions(calib=data, force=True, ingest=ing, measure_latency=False)
    if goal:
        planning = PlanSettings(parse_budget(goal["budget"]), parse_goal(goal["min_fidelity"], trust_code=True))
        opts = replace(opts, planning=planning, distill=DistillOptions() if goal.get("distill") else None)
    api.compile(model.path, output=out, options=opts)


def tools(skip_modelopt: str, model: BenchModel | None = None) -> dict:
    t = {
        "ort static MinMax": lambda m, o, c: peers.ort_static(m.path, o, c, "MinMax"),
        "ort static Entropy": lambda m, o, c: peers.ort_static(m.path, o, c, "Entropy"),
        "ort static Percentile": lambda m, o, c: peers.ort_static(m.path, o, c, "Percentile"),
        "ort dynamic": lambda m, o, c: peers.ort_dynamic(m.path, o, c),
    }
    if not skip_modelopt:
        t["modelopt entropy"] = lambda m, o, c: peers.modelopt(m.path, o, c, "entropy")
        t["modelopt max"] = lambda m, o, c: peers.modelopt(m.path, o, c, "max")
    t["dscompile (DMPQ)"] = ours
    for goal in model.meta.get("goals", ()) if model is not None else ():  # the goal, asked at compile time
        floor = goal.get("label", goal["min_fidelity"])
        name = f"dscompile (DMPQ, {goal['budget']}, {floor}{', distill' if goal.get('distill') else ''})"
        t[name] = lambda m, o, c, goal=goal: ours(m, o, c, goal)
    return t


def bench(model: BenchModel, n_calib: int, n_hold: int, work: Path, skip_modelopt: str,
          only_tools: tuple[str, ...] = (), prebuilt: dict[str, Path] | None = None) -> list[dict]:
    feeds = model.make_feeds(n_calib + n_hold, 0)
    calib, hold = feeds[:n_calib], feeds[n_calib:]
    fp32 = _session(model.path)
    ref = _run(fp32, hold)
    t_fp32 = _p50(fp32, hold[0])
    base = _size(model.path)
    rows = []
    todo = {k: v for k, v in tools(skip_modelopt, model).items() if not only_tools or any(t in k for t in only_tools)}
    for name, path in (prebuilt or {}).items():  # built beforehand from the same calibration samples
        todo[name] = lambda m, o, c, path=path: shutil.copy(path, o)
    for name, fn in todo.items():
        out = work / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", name) + ".onnx")
        row = {"model": model.name, "tool": name, **({"prebuilt": str(prebuilt[name])} if name in (prebuilt or {}) else {})}
        start = time.perf_counter()
        try:
            fn(model, out, calib)
            row["tool_s"] = round(time.perf_counter() - start, 1) if "prebuilt" not in row else "built separately"
            sess = _session(out)
            row.update(fidelity(model.kind, ref, _run(sess, hold)))
            row["size_ratio"] = round(_size(out) / base, 4)
            row["latency_ratio"] = round(latency_ratio(sess, fp32, hold[0]), 3)
        except Exception as exc:  # a peer that fails on a model is a result, not a crash
            row["failed"] = " ".join(str(exc).split())[:160] or type(exc).__name__
            row["tool_s"] = round(time.perf_counter() - start, 1)
        logging.getLogger("bench").warning("%s", row)
        rows.append(row)
    rows.append({"model": model.name, "tool": "fp32", "fp32_ms_p50": round(t_fp32, 3), "calib": n_calib, "held_out": n_hold})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | tool | task fidelity | cosine | size × FP32 | latency × FP32 | tool time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["tool"] == "fp32":
            continue
        if "failed" in r:
            lines.append(f"| {r['model']} | {r['tool']} | failed: {r['failed'][:90]} | | | | {r['tool_s']} |")
            continue
        extra = "".join(f", {k.replace('_', ' ')} {r[k]:.3f}" for k in ("class_agreement", "nn_agreement") if k in r)
        lines.append(f"| {r['model']} | {r['tool']} | {r['task_name']} {r['task']:.4f}{extra} | {r['cosine']:.4f} | "
                     f"{r['size_ratio']:.3f} | {r['latency_ratio']:.3f} | {r['tool_s']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dscompile-bench")
    ap.add_argument("--only", help="Run only models whose name contains this.")
    ap.add_argument("--calib", type=int, default=48)
    ap.add_argument("--held-out", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("dmpq_vs_peers.json"))
    ap.add_argument("--no-zoo", action="store_true")
    ap.add_argument("--tools", help="Comma-separated parts of tool names to run (e.g. 'dscompile,ort dynamic').")
    ap.add_argument("--prebuilt", action="append", default=[], metavar="TOOL=MODEL.onnx",
                    help="Also measure an artifact built beforehand on the same --calib samples (its tool time is not timed).")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    ok, why = peers.modelopt_available()
    if not ok:
        print(f"Model Optimizer skipped: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        models = real_models(args.cache) + ([] if args.no_zoo else zoo_models(Path(tmp)))
        rows = []
        for m in models:
            if args.only and args.only not in m.name:
                continue
            work = Path(tmp) / m.name.split()[0]
            work.mkdir(exist_ok=True)
            only = tuple(t.strip() for t in args.tools.split(",")) if args.tools else ()
            pre = {k: Path(v) for k, _, v in (p.partition("=") for p in args.prebuilt)}
            rows += bench(m, args.calib, args.held_out, work, "" if ok else why, only, pre)
            shutil.rmtree(work, ignore_errors=True)
    result = {"versions": peers.describe(), "rows": rows,
              "where": "onnxruntime CPUExecutionProvider, 1 thread, this machine"}
    args.out.write_text(json.dumps(result, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
