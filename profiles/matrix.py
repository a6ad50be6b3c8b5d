"""The FPS matrix: model x device x precision cells, each measured, estimated or missing (with why).

Written as ``matrix.json`` (rows ``{"model", "device", "precision", "batch", "fps",
"latency_ms": {"p50", "p99"}, "kind", "source", ...}``), ``matrix.csv``, ``matrix.md``
and ``matrix.png`` (plots.py).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from dscompile.errors import InputError
from dscompile.fileio import atomic_dir, check_writable

CellKind = Literal["measured", "estimated", "missing"]
MATRIX_FORMAT = "dscompile-matrix/1"


@dataclass(frozen=True)
class Cell:
    """One model on one device at one precision and batch.

    ``source`` says how the number was obtained: the runtime, version, machine
    and threads for a measurement; the device profile file for an estimate;
    why there is no number for a missing cell.
    """

    model: str
    device: str
    precision: str
    batch: int
    kind: CellKind
    source: str
    fps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    runtime: str = ""  # "onnxruntime 1.32.0 CPUExecutionProvider", "roofline", ...
    machine: str = ""
    threads: int | None = None
    peak_memory_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "model": self.model, "device": self.device, "precision": self.precision, "batch": self.batch,
            "fps": _round(self.fps), "latency_ms": {"p50": _round(self.p50_ms), "p99": _round(self.p99_ms)},
            "kind": self.kind, "source": self.source,
        }
        for key in ("runtime", "machine", "threads", "peak_memory_mb"):
            value = getattr(self, key)
            if value not in ("", None):
                row[key] = _round(value) if isinstance(value, float) else value
        if self.extra:
            row["extra"] = self.extra
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Cell:
        lat = row.get("latency_ms") or {}
        return cls(
            row["model"], row["device"], row["precision"], int(row["batch"]), row["kind"], row["source"],
            row.get("fps"), lat.get("p50"), lat.get("p99"), row.get("runtime", ""), row.get("machine", ""),
            row.get("threads"), row.get("peak_memory_mb"), row.get("extra", {}),
        )


def _round(x: Any, digits: int = 4) -> Any:
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if abs(x) < 1 else round(x, 3)
    return x


def measured_cell(model: str, device: str, precision: str, batch: int, p50_ms: float, p99_ms: float, **kw: Any) -> Cell:
    return Cell(model, device, precision, batch, "measured", kw.pop("source"), batch * 1e3 / p50_ms, p50_ms, p99_ms, **kw)


def estimated_cell(model: str, device: str, precision: str, batch: int, latency_ms: float, source: str, **kw: Any) -> Cell:
    return Cell(model, device, precision, batch, "estimated", source, batch * 1e3 / latency_ms, latency_ms, None,
                runtime=kw.pop("runtime", "roofline"), **kw)


def missing_cell(model: str, device: str, precision: str, why: str, batch: int = 1) -> Cell:
    return Cell(model, device, precision, batch, "missing", why)


@dataclass
class FpsMatrix:
    cells: list[Cell] = field(default_factory=list)

    def add(self, cells: Cell | Iterable[Cell]) -> None:
        self.cells.extend([cells] if isinstance(cells, Cell) else cells)

    def merged(self, other: FpsMatrix) -> FpsMatrix:
        return FpsMatrix([*self.cells, *other.cells])

    def models(self) -> list[str]:
        return list(dict.fromkeys(c.model for c in self.cells))

    def columns(self) -> list[tuple[str, str]]:
        """(device, precision) pairs in first-seen order."""
        return list(dict.fromkeys((c.device, c.precision) for c in self.cells))

    def best(self, model: str, device: str, precision: str, batch: int | None = 1) -> Cell | None:
        """The cell shown for a (model, device, precision): measured before estimated before missing."""
        order = {"measured": 0, "estimated": 1, "missing": 2}
        found = [c for c in self.cells if (c.model, c.device, c.precision) == (model, device, precision)
                 and (batch is None or c.batch == batch or c.kind == "missing")]
        return min(found, key=lambda c: order[c.kind]) if found else None

    def to_json(self) -> dict[str, Any]:
        return {"format": MATRIX_FORMAT, "rows": [c.to_json() for c in self.cells]}

    @classmethod
    def from_json(cls, data: dict[str, Any], origin: str = "matrix") -> FpsMatrix:
        if not isinstance(data, dict) or data.get("format") != MATRIX_FORMAT:
            raise InputError(f"{origin}: not a dscompile FPS matrix (expected \"format\": \"{MATRIX_FORMAT}\")")
        try:
            return cls([Cell.from_json(r) for r in data["rows"]])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{origin}: malformed matrix row ({exc})") from None

    @classmethod
    def load(cls, path: str | Path) -> FpsMatrix:
        try:
            return cls.from_json(json.loads(Path(path).read_text()), str(path))
        except FileNotFoundError:
            raise InputError(f"{path}: no such matrix file") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from None

    def to_csv(self) -> str:
        buf = io.StringIO()
        cols = ["model", "device", "precision", "batch", "fps", "p50_ms", "p99_ms", "kind", "runtime", "machine",
                "threads", "peak_memory_mb", "source"]
        w = csv.DictWriter(buf, cols, lineterminator="\n")
        w.writeheader()
        for c in self.cells:
            row = {k: v for k, v in asdict(c).items() if k in cols}
            w.writerow({k: ("" if v is None else _round(v)) for k, v in row.items()})
        return buf.getvalue()

    def to_markdown(self, batch: int = 1) -> str:
        """Models as rows, device/precision as columns; estimated cells marked ``~``, missing ``—``."""
        cols = self.columns()
        head = "| model | " + " | ".join(f"{d} {p}" for d, p in cols) + " |"
        lines = [head, "|" + "---|" * (len(cols) + 1)]
        for m in self.models():
            cells = [self.best(m, d, p, batch) for d, p in cols]
            lines.append(f"| {m} | " + " | ".join(_md_cell(c) for c in cells) + " |")
        lines += ["", "FPS at batch 1. Plain: measured; ~: estimated (roofline from the device profile); —: missing (see matrix.json for why)."]
        return "\n".join(lines) + "\n"


def _md_cell(c: Cell | None) -> str:
    if c is None or c.kind == "missing" or c.fps is None:
        return "—"
    text = f"{c.fps:,.0f}" if c.fps >= 100 else f"{c.fps:.3g}"
    return f"~{text}" if c.kind == "estimated" else text


def save_matrix(matrix: FpsMatrix, folder: str | Path, force: bool = False, title: str = "FPS at batch 1") -> Path:
    """matrix.json, matrix.csv, matrix.md and matrix.png in ``folder``, all or nothing."""
    from dscompile.profiles.plots import heatmap

    out = check_writable(folder, force)
    with atomic_dir(out, force) as tmp:
        (tmp / "matrix.json").write_text(json.dumps(matrix.to_json(), indent=2) + "\n")
        (tmp / "matrix.csv").write_text(matrix.to_csv())
        (tmp / "matrix.md").write_text(matrix.to_markdown())
        heatmap(matrix, tmp / "matrix.png", title=title)
    return out
