"""vote-k: ours (faiss kNN + incremental greedy) against the reference's O(n^2) formulation.

The anchor is ``fast_votek_reference`` from ``tests/selectors/test_votek.py`` (the reference algorithm
re-derived: cosine row by row, full re-scoring every pick). Data: a Gaussian mixture in d = 384 (the
MiniLM width), float32 and mean-centred, as the reference feeds it. Both pick the same indices (checked).
``python -m bench.votek --million`` times one selection from 1,000,000 documents (approximate IVF index).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from tokensift.selectors import votek


def _embeddings(n: int, d: int = 384, clusters: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        x[lo:hi] = centres[rng.integers(clusters, size=hi - lo)] + rng.normal(size=(hi - lo, d)).astype(np.float32)
    return x - x.mean(0)


def run(quick: bool = False) -> list[dict]:
    from tests.selectors.test_votek import fast_votek_reference

    n, budget, k = (2_000, 10, 150) if quick else (20_000, 50, 150)
    x = _embeddings(n)
    t0 = time.perf_counter()
    ours = votek.select(x, budget, k=k, center=False)
    t1 = time.perf_counter()
    reference = fast_votek_reference(x.astype(np.float64), budget, k)
    t2 = time.perf_counter()
    same = ours == reference
    return [{
        "measure": f"vote-k select {budget} of n={n:,} (d=384, k={k})",
        "ours": round(t1 - t0, 3),
        "anchor": round(t2 - t1, 3),
        "unit": "s",
        "ratio": round((t2 - t1) / (t1 - t0), 1),
        "note": f"ratio = anchor time / ours (speed-up); anchor = reference O(n^2) fast_votek; "
                f"identical picks: {same}",
    }]


def million(n: int = 1_000_000, budget: int = 1_000) -> dict:
    """One vote-k selection from ``n`` documents with the IVF index; seconds per phase."""
    x = _embeddings(n)
    t0 = time.perf_counter()
    graph = votek.build_graph(x, k=150, center=True, index="ivf", nprobe=4)
    t1 = time.perf_counter()
    picks, _ = votek.fast_votek(graph, budget)
    t2 = time.perf_counter()
    return {"n": n, "budget": budget, "graph_s": round(t1 - t0, 1), "greedy_s": round(t2 - t1, 1),
            "coverage": votek.coverage(graph, picks), "distinct": len(set(picks))}


if __name__ == "__main__":
    print(million() if "--million" in sys.argv else run(quick="--quick" in sys.argv))
