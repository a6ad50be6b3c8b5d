"""Detection fidelity for benchmarks/tflite_vs_peers.py: YOLOv8 decoding, NMS and F1 against FP32."""

from __future__ import annotations

import numpy as np


def cosine(ref, got) -> float:
    vals = []
    for r, g in zip(ref, got, strict=True):
        a, b = r[0].astype(np.float64).ravel(), g[0].astype(np.float64).ravel()
        vals.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)))
    return float(np.mean(vals))


def detections(out: np.ndarray, thr: float = 0.25, iou: float = 0.45) -> list[tuple[int, np.ndarray]]:
    """YOLOv8 output [1, 4+C, N] -> [(class, xyxy)] after per-class NMS (as nudenet does)."""
    p = out[0].T
    scores = p[:, 4:].max(1)
    cls = p[:, 4:].argmax(1)
    keep = np.where(scores >= thr)[0]
    boxes = np.stack([p[keep, 0] - p[keep, 2] / 2, p[keep, 1] - p[keep, 3] / 2,
                      p[keep, 0] + p[keep, 2] / 2, p[keep, 1] + p[keep, 3] / 2], 1)
    order = np.argsort(-scores[keep])
    chosen: list[tuple[int, np.ndarray]] = []
    for j in order:
        b, c = boxes[j], int(cls[keep][j])
        if all(c != cc or _iou(b, bb) < iou for cc, bb in chosen):
            chosen.append((c, b))
    return chosen


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detection_f1(ref, got) -> dict[str, float]:
    """Detections of the build matched to the FP32 model's (same class, IoU >= 0.5): F1."""
    tp = fp = fn = 0
    for r, g in zip(ref, got, strict=True):
        want, have = detections(r[0]), detections(g[0])
        used = set()
        for c, b in want:
            hit = next((i for i, (cc, bb) in enumerate(have) if i not in used and cc == c and _iou(b, bb) >= 0.5), None)
            if hit is None:
                fn += 1
            else:
                used.add(hit)
                tp += 1
        fp += len(have) - len(used)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {"detection_f1_vs_fp32": f1, "fp32_detections": tp + fn, "output_cosine": cosine(ref, got)}
