"""The PNG plots of a snapshot report (matplotlib's object API on the Agg canvas: no pyplot state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

KEPT, POOL, LINE = "#1f77b4", "#bbbbbb", "#d62728"


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def histogram(path: Path, kept: np.ndarray, title: str, pool: np.ndarray | None = None,
              thresholds: list[tuple[str, float]] = ()) -> Path:
    """Histogram of ``kept`` values (over ``pool`` in grey when given) with vertical threshold lines."""
    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    both = np.concatenate([kept, pool]) if pool is not None else kept
    bins = np.histogram_bin_edges(both[np.isfinite(both)], bins=40) if both.size else 10
    if pool is not None:
        ax.hist(pool, bins=bins, color=POOL, label=f"all scored ({pool.size:,})")
    ax.hist(kept, bins=bins, color=KEPT, alpha=0.85, label=f"kept ({kept.size:,})")
    for label, x in thresholds:
        ax.axvline(x, color=LINE, linestyle="--", linewidth=1.5, label=f"{label}: {x:.4g}")
    ax.set(title=title, xlabel="value", ylabel="documents")
    ax.legend(fontsize=8)
    return _save(fig, path)


def bars(path: Path, labels: list[str], values: list[float], title: str, xlabel: str,
         notes: list[str] | None = None, xlim: tuple[float, float] | None = None) -> Path:
    """Horizontal bars, one per label (top to bottom in the given order), with an optional note at each."""
    fig = Figure(figsize=(7, 0.9 + 0.32 * len(labels)))
    ax = fig.subplots()
    y = np.arange(len(labels))
    ax.barh(y, values, color=KEPT)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(title=title, xlabel=xlabel)
    if xlim:
        ax.set_xlim(*xlim)
    top = ax.get_xlim()[1]
    for yi, v, note in zip(y, values, notes or [""] * len(labels), strict=True):
        if note:
            ax.text(min(v, top) + 0.01 * top, yi, note, va="center", fontsize=7)
    ax.margins(x=0.15)
    return _save(fig, path)


def token_weights(path: Path, weights: np.ndarray, doc_means: np.ndarray) -> Path:
    """Two histograms: every token weight, and the mean weight of each document."""
    fig = Figure(figsize=(9, 3.2))
    a, b = fig.subplots(1, 2)
    counts, _, _ = a.hist(weights, bins=40, color=KEPT)
    a.set(title=f"token weights ({weights.size:,} tokens)", xlabel="weight", ylabel="tokens")
    if counts.max() > 100 * counts[counts > 0].min():  # log only when the counts span decades
        a.set_yscale("log")
    b.hist(doc_means, bins=40, color=KEPT)
    b.set(title=f"mean weight per document ({doc_means.size:,})", xlabel="mean weight", ylabel="documents")
    return _save(fig, path)
