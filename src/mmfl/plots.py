"""Evaluation figures: the CMC curve and a grid of ranked results with hits framed.

Figures are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas, never through
``pyplot``: no global backend state, no display needed, safe in servers and worker threads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mmfl.data.images import load_crop
from mmfl.data.records import Record

HIT_COLOUR = "#1a9850"
MISS_COLOUR = "#d73027"
THUMB_PX = 128


def plot_cmc(curves: Mapping[str, Sequence[float]], path: str | Path, title: str = "CMC") -> Path:
    """Plot top-k hit rate against k (k = 1..len(curve)) for each named curve; write a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=100)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        values = 100.0 * np.asarray(curve, dtype=float)
        ranks = np.arange(1, len(values) + 1)
        ax.plot(ranks, values, label=f"{name} (top-1 {values[0]:.1f}%)" if len(values) else name)
    ax.set_xlabel("rank k")
    ax.set_ylabel("top-k hit rate (%)")
    ax.set_ylim(0, 101)  # a curve at 100% stays visible above the frame
    ax.set_xlim(left=1)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    if curves:
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_ranked_grid(
    query_records: Sequence[Record],
    gallery_records: Sequence[Record],
    ranked_idx: np.ndarray,
    hits: np.ndarray,
    path: str | Path,
    n: int = 8,
    top: int = 10,
) -> Path:
    """One row per query: the query image, then its ``top`` best gallery images in rank order.

    ``ranked_idx[i]`` holds gallery indices for ``query_records[i]`` and ``hits[i]`` whether each
    shows the query's item; hits are framed green, misses red. Boxes crop images as in evaluation.
    """
    from matplotlib.figure import Figure

    rows = min(n, len(query_records))
    cols = 1 + min(top, ranked_idx.shape[1] if rows else 0)
    fig = Figure(figsize=(1.3 * cols, 1.5 * max(rows, 1)), dpi=100)
    for r in range(rows):
        ax = fig.add_subplot(rows, cols, r * cols + 1)
        _show(ax, query_records[r], "query", "black")
        for c in range(cols - 1):
            g = int(ranked_idx[r, c])
            ax = fig.add_subplot(rows, cols, r * cols + c + 2)
            colour = HIT_COLOUR if hits[r, c] else MISS_COLOUR
            _show(ax, gallery_records[g], f"#{c + 1}", colour)
    fig.tight_layout(pad=0.3)
    return _save(fig, path)


def _show(ax, record: Record, label: str, colour: str) -> None:
    img = load_crop(record.path, record.box, record.path, min_size=THUMB_PX)
    img.thumbnail((THUMB_PX, THUMB_PX))
    ax.imshow(np.asarray(img))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{label} {record.item_id}"[:22], fontsize=6, color=colour)
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3 if colour != "black" else 1)


def _save(fig, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png")
    return path
