"""SIFT: ours against ``activeft==0.1.1`` (``Retriever``, exact VTL), queries per second with identical picks.

Pool: n = 20,000 unit vectors in d = 384 (a Gaussian mixture, the MiniLM width); each query is a noisy copy
of a pool row. Both pre-select K = 999 candidates by absolute inner product with faiss (below activeft's
mini-batch of 1,000, so its greedy is exact) and pick N = 50. Same process, one query at a time each.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from tokensift.selectors import sift


def _data(n: int, d: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, d))
    pool = centres[rng.integers(40, size=n)] + rng.normal(size=(n, d))
    q = pool[rng.choice(n, queries, replace=False)] + 0.5 * rng.normal(size=(queries, d))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return unit(pool), unit(q)


def run(quick: bool = False) -> list[dict]:
    import faiss
    import torch
    from activeft.sift import Retriever

    n, d, n_queries, picks, k = 20_000, 384, (4 if quick else 40), 50, 999
    pool, queries = _data(n, d, n_queries)
    index = faiss.IndexFlatIP(d)
    index.add(pool)
    retriever = Retriever(index, llambda=0.01, device=torch.device("cpu"))
    t0 = time.perf_counter()
    theirs = [retriever.search(q[None], N=picks, K=k)[1].tolist() for q in queries]
    t1 = time.perf_counter()
    ours = sift.select_per_query(pool, queries, picks, candidates=k, use_ray=False)
    t2 = time.perf_counter()
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    return [{
        "measure": f"SIFT queries/s (n={n:,}, d={d}, K={k}, N={picks}, {n_queries} queries)",
        "ours": round(n_queries / (t2 - t1), 2),
        "anchor": round(n_queries / (t1 - t0), 2),
        "unit": "queries/s",
        "ratio": round((t1 - t0) / (t2 - t1), 1),
        "note": f"ratio = ours / anchor (queries/s); anchor = activeft 0.1.1 Retriever; identical picks "
                f"for {same}/{n_queries} queries; one process, no Ray",
    }]


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
