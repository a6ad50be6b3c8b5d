"""Fidelity of an artifact against its FP32 source, on the same samples."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dscompile.errors import InputError

Feed = dict[str, np.ndarray]
RunFn = Callable[[Feed], list[np.ndarray]]


@dataclass(frozen=True)
class Fidelity:
    samples: int
    cosine: float  # mean over samples and outputs of the cosine similarity
    max_abs_err: float
    top1_agreement: float | None  # fraction of rows whose argmax agrees, for class-score outputs
    measured_with: str
    user: float | None = None  # mean of the user's metric over the samples (--min-fidelity MODULE:FUNCTION=V)
    user_metric: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "samples": self.samples, "cosine": round(self.cosine, 6), "max_abs_err": float(f"{self.max_abs_err:.6g}"),
            "top1_agreement": None if self.top1_agreement is None else round(self.top1_agreement, 6),
            "measured_with": self.measured_with,
            **({"user": {"metric": self.user_metric, "value": round(self.user, 6)}} if self.user is not None else {}),
        }


def looks_like_scores(a: np.ndarray) -> bool:
    """A float [N, C] (or [C]) output with C > 1: class scores or logits."""
    return np.issubdtype(a.dtype, np.floating) and a.ndim in (1, 2) and a.shape[-1] > 1


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64 = a.astype(np.float64).ravel()
    b64 = b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a64 @ b64 / (na * nb))


@dataclass(frozen=True)
class UserMetric:
    """The user's score of one sample: ``fn(reference_outputs, candidate_outputs, feed) -> float``."""

    name: str  # MODULE:FUNCTION
    fn: Callable[[list[np.ndarray], list[np.ndarray], Feed], float]

    def score(self, ref: list[np.ndarray], got: list[np.ndarray], feed: Feed) -> float:
        try:
            value = float(self.fn(ref, got, feed))
        except Exception as exc:  # user code may raise anything
            raise InputError(f"fidelity metric {self.name} raised {type(exc).__name__}: {exc}") from None
        if not np.isfinite(value):
            raise InputError(f"fidelity metric {self.name} returned {value}, not a finite number")
        return value


def compare(reference: RunFn, candidate: RunFn, feeds: Sequence[Feed], measured_with: str,
            metric: UserMetric | None = None) -> Fidelity:
    cosines: list[float] = []
    scores: list[float] = []
    worst = 0.0
    agree = rows = 0
    for feed in feeds:
        ref, got = reference(feed), candidate(feed)
        if metric is not None:
            scores.append(metric.score([np.asarray(r) for r in ref], [np.asarray(g) for g in got], feed))
        for r, g in zip(ref, got, strict=True):
            g = np.asarray(g).reshape(r.shape) if np.asarray(g).size == r.size else np.asarray(g)
            if r.shape != g.shape:
                raise ValueError(f"output shape {g.shape} differs from the source's {r.shape}")
            cosines.append(cosine(r, g))
            if r.size:
                worst = max(worst, float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))))
            if looks_like_scores(r):
                r2, g2 = r.reshape(-1, r.shape[-1]), g.reshape(-1, g.shape[-1])
                agree += int(np.sum(r2.argmax(-1) == g2.argmax(-1)))
                rows += r2.shape[0]
    top1 = agree / rows if rows else None
    user = float(np.mean(scores)) if metric is not None and scores else None
    return Fidelity(len(feeds), float(np.mean(cosines)) if cosines else 1.0, worst, top1, measured_with,
                    user, metric.name if metric is not None else None)
