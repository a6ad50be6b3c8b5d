"""matrix.png: a heat map of FPS, models x (device, precision); estimated cells hatched, missing grey."""

from __future__ import annotations

import math
from pathlib import Path

from dscompile.profiles.matrix import FpsMatrix


def heatmap(matrix: FpsMatrix, path: Path, batch: int = 1, title: str = "FPS at batch 1") -> Path:
    """Draw the matrix; colour is log10(FPS). Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch, Rectangle

    models, cols = matrix.models(), matrix.columns()
    fps = [[_fps(matrix.best(m, d, p, batch)) for d, p in cols] for m in models]
    logs = [math.log10(v) for row in fps for v in row if v]
    norm = Normalize(min(logs, default=0.0), max(logs, default=1.0) + 1e-9)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(1.6 + 1.25 * len(cols), 1.2 + 0.55 * len(models)), dpi=110)
    for i, m in enumerate(models):
        for j, (d, p) in enumerate(cols):
            cell = matrix.best(m, d, p, batch)
            value = fps[i][j]
            color = cmap(norm(math.log10(value))) if value else (0.85, 0.85, 0.85, 1.0)
            hatch = "///" if cell is not None and cell.kind == "estimated" else None
            ax.add_patch(Rectangle((j, i), 1, 1, facecolor=color, edgecolor="white", hatch=hatch, linewidth=1.5))
            text = "n/a" if not value else (f"{value:,.0f}" if value >= 100 else f"{value:.3g}")
            if cell is not None and cell.kind == "estimated" and value:
                text = "~" + text
            dark = value and norm(math.log10(value)) < 0.6
            ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xlim(0, len(cols))
    ax.set_ylim(len(models), 0)
    ax.set_xticks([j + 0.5 for j in range(len(cols))], [f"{d}\n{p}" for d, p in cols], rotation=45, ha="right", fontsize=7)
    ax.set_yticks([i + 0.5 for i in range(len(models))], models, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(
        handles=[Patch(facecolor="white", edgecolor="black", label="measured"),
                 Patch(facecolor="white", edgecolor="black", hatch="///", label="estimated (~)"),
                 Patch(facecolor=(0.85, 0.85, 0.85), label="missing")],
        loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fps(cell) -> float | None:
    return cell.fps if cell is not None and cell.kind != "missing" and cell.fps else None
