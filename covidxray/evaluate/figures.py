"""Figures of evaluation results (matplotlib, headless), written atomically as PNG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from covidxray.utils import atomic_path


def pyplot():
    """matplotlib's pyplot on the headless Agg backend (imported on the first figure: ~0.5 s)."""
    import matplotlib  # local: matplotlib (~0.5 s) only when a figure is drawn

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # local: matplotlib (~0.5 s) only when a figure is drawn

    return plt


def save_figure(fig, path: str | os.PathLike, **savefig) -> Path:
    """Write ``fig`` as a PNG atomically (a reader sees the old file or the new one, never half of one)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **savefig)
    return path


def save_confusion_png(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike,
                       title: str = "") -> Path:
    """A confusion matrix as a paper-ready PNG: each cell shows its count and its share of the true class
    (the row-normalised value, i.e. that class's recall on the diagonal), colour by that share."""
    plt = pyplot()
    m = np.asarray(confusion, dtype=float)
    rows = m.sum(1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    k = len(classes)
    names = [c.replace("_", " ") for c in classes]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * k, 1.2 + 1.1 * k), dpi=150)
    try:
        im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{int(m[i, j])}\n{100 * share[i, j]:.0f}%", ha="center", va="center", fontsize=9,
                        color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks(range(k), names, rotation=30, ha="right")
        ax.set_yticks(range(k), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if title:
            ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
        fig.tight_layout()
        return save_figure(fig, path, bbox_inches="tight")
    finally:
        plt.close(fig)
