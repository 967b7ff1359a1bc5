"""SIFT: select data that minimises the posterior variance of the targets (Hübotter et al., 2024,
"Efficiently Learning at Test-Time: Active Fine-Tuning of LLMs"; reference ``activeft``, ``VTL``/``Retriever``).

Linear kernel on unit-norm embeddings, k(x, x') = <x, x'>, noise lambda (default 0.01). After observing the
multiset X_n, k_n(a, b) = k(a, b) - k(a, X_n) (K_{X_n} + lambda I)^(-1) k(X_n, b), and the greedy step is

    x_{n+1} = argmin_x sum_{a in targets} [ k_n(a, a) - k_n(a, x)^2 / (k_n(x, x) + lambda) ].

Repeats are allowed (a repeat still reduces variance through the noise term). The value of a pick is minus
the targets' total posterior variance after it, as in ``activeft``. Each pick conditions a feature-space
factor (Sigma_n = I - W^T W, one row of W per pick), so a step costs O(K (d + r)) for K candidates and
r = min(m, d) target rows (m > d targets are replaced by R with R^T R = A^T A, which leaves the objective
unchanged) instead of the reference's O((K + m)^2).

Pre-selection (``candidates=K``): faiss inner-product search with the mean target for the top K, or, with
``absolute`` (the reference default), the top K by |inner product| (searching q and -q). SIFT-Fast
(``fast``): the reference's lazy greedy, a max-heap initialised with <x, mean target>^2 / (|x|^2 + lambda),
pop, recompute the true variance reduction, push back, accept when it still tops the heap (values are
reductions; an approximation, the objective is not submodular). Many queries at once: one selection per
query, a Ray task per batch of queries.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from tokensift.pipeline import schema
from tokensift.pipeline.registry import register
from tokensift.pipeline.stage import Selection
from tokensift.selectors.knn import unit_rows

DISTINCT_STEPS = 10  # with ``distinct``, at most this many greedy steps per document asked for


class _Posterior:
    """Posterior of the linear kernel over candidates ``x`` (K x d) and targets ``a`` (m x d)."""

    def __init__(self, x: np.ndarray, a: np.ndarray, lam: float):
        self.mean_target = a.mean(0)
        if len(a) > a.shape[1]:
            a = np.linalg.qr(a, mode="r")  # R^T R = A^T A: same sum_a k(a, .)^2 and trace
        self.x, self.a, self.lam = x, a, lam
        self.w = np.zeros((16, x.shape[1]))  # factor rows, grown by doubling
        self.t = 0
        self.total = float((a * a).sum())  # sum_a k_n(a, a)

    def column(self, i: int) -> tuple[np.ndarray, float]:
        """``(Sigma_n x_i, k_n(x_i, x_i))``."""
        s = self.x[i] - self.w[: self.t].T @ (self.w[: self.t] @ self.x[i])
        return s, float(self.x[i] @ s)

    def reduction(self, i: int) -> float:
        """sum_a k_n(a, x_i)^2 / (k_n(x_i, x_i) + lambda), the variance removed by observing x_i."""
        s, kii = self.column(i)
        return float(((self.a @ s) ** 2).sum() / (kii + self.lam))

    def observe(self, i: int) -> np.ndarray:
        """Condition on x_i; returns the new factor row w = Sigma_n x_i / sqrt(k_n(x_i, x_i) + lambda)."""
        s, kii = self.column(i)
        w = s / np.sqrt(kii + self.lam)
        self.total -= float(((self.a @ w) ** 2).sum())
        if self.t == len(self.w):
            self.w = np.concatenate([self.w, np.zeros_like(self.w)])
        self.w[self.t] = w
        self.t += 1
        return w


def vtl(x: np.ndarray, targets: np.ndarray, budget: int, lam: float = 0.01, fast: bool = False,
        distinct: bool = False) -> tuple[list[int], list[float]]:
    """Greedy VTL picks over the rows of ``x`` for ``targets``: ``(indices, values)`` in selection order.

    ``budget`` greedy steps; with ``distinct``, steps (repeats still allowed) until ``budget`` different
    rows are picked, at most ``DISTINCT_STEPS * budget`` steps. Values: minus the total posterior variance
    after each pick (exact), or the variance reduction of each pick (``fast``), as the reference reports.
    """
    x = np.asarray(x, np.float64)
    if distinct and budget > len(x):
        raise ValueError(f"sift: {budget} distinct picks asked from {len(x)} candidates")
    post = _Posterior(x, np.asarray(targets, np.float64), lam)
    steps = DISTINCT_STEPS * budget if distinct else budget
    return (_lazy if fast else _exact)(post, steps, budget)


def _exact(post: _Posterior, steps: int, budget: int) -> tuple[list[int], list[float]]:
    x, a, lam = post.x, post.a, post.lam
    cov = a @ x.T  # k_n(a, x), r x K
    var = np.einsum("kd,kd->k", x, x)  # k_n(x, x)
    picks, values, seen = [], [], set()
    while len(picks) < steps and len(seen) < budget:
        i = int(np.argmax((cov * cov).sum(0) / (var + lam)))
        w = post.observe(i)
        lx = x @ w
        var -= lx * lx
        cov -= np.outer(a @ w, lx)
        picks.append(i)
        seen.add(i)
        values.append(-post.total)
    return picks, values


def _lazy(post: _Posterior, steps: int, budget: int) -> tuple[list[int], list[float]]:
    x, lam = post.x, post.lam
    bound = (x @ post.mean_target) ** 2 / (np.einsum("kd,kd->k", x, x) + lam)
    heap = [(-v, i) for i, v in enumerate(bound.tolist())]
    heapq.heapify(heap)
    picks, values, seen = [], [], set()
    while len(picks) < steps and len(seen) < budget:
        while True:
            _, i = heapq.heappop(heap)
            value = post.reduction(i)
            done = not heap or value >= -heap[0][0]
            heapq.heappush(heap, (-value, i))
            if done:
                break
        post.observe(i)
        picks.append(i)
        seen.add(i)
        values.append(value)
    return picks, values


def preselect(pool: np.ndarray, query: np.ndarray, k: int, absolute: bool = True,
              index: faiss.Index | None = None) -> np.ndarray:
    """The ``k`` pool rows with the largest (absolute) inner product with ``query`` (descending)."""
    if index is None:
        index = faiss.IndexFlatIP(pool.shape[1])
        index.add(np.ascontiguousarray(pool, np.float32))
    q = np.ascontiguousarray(query, np.float32).reshape(1, -1)
    k = min(k, index.ntotal)
    dist, ids = index.search(q, k)
    if absolute:
        dist2, ids2 = index.search(-q, k)
        dist, ids = np.concatenate([dist, dist2], 1), np.concatenate([ids, ids2], 1)
        order = np.argsort(-dist[0], kind="stable")
        ids = ids[:, order]
        _, first = np.unique(ids[0], return_index=True)
        ids = ids[:, np.sort(first)]
    return ids[0, :k]


def search(pool: np.ndarray, queries: np.ndarray, budget: int, lam: float = 0.01, candidates: int | None = None,
           *, fast: bool = False, absolute: bool = True, distinct: bool = False) -> tuple[list[int], list[float]]:
    """SIFT for one target set: ``(pool indices, values)`` in selection order (see :func:`select`)."""
    return _search(_unit(pool, "pool"), queries, budget, lam, candidates, fast, absolute, distinct)


def _search(pool: np.ndarray, queries: np.ndarray, budget: int, lam: float, candidates: int | None, fast: bool,
            absolute: bool, distinct: bool, index: faiss.Index | None = None) -> tuple[list[int], list[float]]:
    """:func:`search` over an already unit-normalised float64 ``pool`` (and an optional faiss index of it)."""
    queries = _unit(np.atleast_2d(queries), "queries")
    if queries.shape[1] != pool.shape[1]:
        raise ValueError(f"sift: queries have dimension {queries.shape[1]}, the pool {pool.shape[1]}")
    if budget < 1 or lam <= 0:
        raise ValueError(f"sift: budget must be >= 1 and lam > 0, got budget={budget}, lam={lam}")
    if candidates is None:
        cand = np.arange(len(pool))
    else:
        cand = preselect(pool, queries.mean(0), candidates, absolute, index)
    picks, values = vtl(pool[cand], queries, budget, lam, fast, distinct)
    return cand[picks].tolist(), values


def select(pool: np.ndarray, queries: np.ndarray, budget: int, lam: float = 0.01, candidates: int | None = None,
           *, fast: bool = False, absolute: bool = True, distinct: bool = False) -> list[int]:
    """SIFT picks for the target set ``queries`` (``m x d``) from ``pool`` (``n x d``), repeats allowed.

    Rows are unit-normalised here. ``candidates=None`` runs the greedy over the whole pool; ``K``
    pre-selects the K rows with the largest (``absolute``: absolute) inner product with the mean query.
    ``fast`` is SIFT-Fast; ``distinct`` runs until ``budget`` different documents are picked. A target set
    of many queries is the corpus-level mode.
    """
    return search(pool, queries, budget, lam, candidates, fast=fast, absolute=absolute, distinct=distinct)[0]


def select_per_query(pool: np.ndarray, queries, budget: int, lam: float = 0.01, candidates: int | None = None,
                     *, fast: bool = False, absolute: bool = True, distinct: bool = False, batch_size: int = 64,
                     use_ray: bool | None = None, num_cpus: float = 1) -> list[list[int]]:
    """One SIFT selection per query (a row of an ``n_q x d`` array, or an ``m_i x d`` array each).

    Query batches run as Ray tasks (the pool goes to the object store once) when ``use_ray`` is true, or
    ``None`` and Ray is initialised; otherwise in this process.
    """
    pool = _unit(pool, "pool")
    batches = [list(queries[i : i + batch_size]) for i in range(0, len(queries), batch_size)]
    args = (budget, lam, candidates, fast, absolute, distinct)
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    if not use_ray:
        return [p for b in batches for p in _query_batch(pool, b, *args)]
    import ray

    task = ray.remote(num_cpus=num_cpus)(_query_batch)
    ref = ray.put(pool)
    return [p for r in ray.get([task.remote(ref, b, *args) for b in batches]) for p in r]


def _query_batch(pool, batch, budget, lam, candidates, fast, absolute, distinct) -> list[list[int]]:
    """SIFT for each query of a batch, sharing one faiss index for the pre-selection."""
    index = None
    if candidates is not None:
        index = faiss.IndexFlatIP(pool.shape[1])
        index.add(np.ascontiguousarray(pool, np.float32))
    return [_search(pool, q, budget, lam, candidates, fast, absolute, distinct, index)[0] for q in batch]


def _unit(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"sift: {what} must be a non-empty 2-D array, got shape {x.shape}")
    bad = ~np.isfinite(x).all(1) | (np.linalg.norm(x, axis=1) == 0)
    if bad.any():
        raise ValueError(f"sift: {what} row {int(np.flatnonzero(bad)[0])} is zero or not finite")
    return unit_rows(x, np.float64)


@dataclass
class SiftParams:
    """Args:
    budget: documents to keep (``distinct``) or greedy picks N (repeats allowed either way, as in the paper;
        the snapshot keeps each document once, in first-pick order).
    lam: noise / regulariser lambda (paper: 0.01).
    candidates: faiss pre-selection size K (``None``: the whole pool).
    fast: SIFT-Fast (lazy greedy).
    absolute: pre-select by absolute inner product (reference default).
    distinct: run the greedy until ``budget`` different documents are picked (``False``: ``budget`` picks).
    column: the embedding column.
    queries_file: target texts, one per line (``.jsonl``: a ``text`` field per line), embedded with ``model``.
    query_column: or: the rows whose ``query_column`` equals ``query_value`` are the targets (and are
        not in the pool).
    query_value: see ``query_column``.
    per_query: one selection of ``budget`` per target (Ray tasks) instead of one for the whole set.
    model: embedding model for ``queries_file`` (``None``: the shipped MiniLM; use the embed stage's).
    device: torch device of that model.
    max_length: its token limit (``None``: the model's).
    """

    budget: int = field(default=100, metadata={"ge": 1})
    lam: float = field(default=0.01, metadata={"gt": 0})
    candidates: int | None = field(default=None, metadata={"ge": 1})
    fast: bool = False
    absolute: bool = True
    distinct: bool = True
    column: str = schema.EMBEDDING
    queries_file: str | None = None
    query_column: str | None = None
    query_value: str | None = None
    per_query: bool = False
    model: str | None = None
    device: str = "cpu"
    max_length: int | None = field(default=None, metadata={"ge": 1})

    def check(self) -> None:
        """The target set comes from exactly one place."""
        if (self.queries_file is None) == (self.query_column is None):
            raise ValueError("set exactly one of queries_file or query_column (with query_value)")
        if self.query_column is not None and self.query_value is None:
            raise ValueError(f"query_column {self.query_column!r} needs query_value")


@register("sift", kind="select", params=SiftParams)
class Sift:
    """Select stage: SIFT over the gathered embeddings for a target set from a file or from matching rows."""

    def __init__(self, params: SiftParams):
        SiftParams.check(params)
        self.p = params

    @classmethod
    def needs(cls, p: SiftParams) -> list[str]:
        return [p.column] + ([p.query_column] if p.query_column else [])

    def select(self, table: pa.Table) -> Selection:
        p = self.p
        ids = np.asarray(table.column(schema.ID).to_pylist(), dtype=object)
        x = schema.embedding_matrix(table.column(p.column))
        if p.query_column:
            values = table.column(p.query_column).to_pylist()
            is_query = np.array([v is not None and str(v) == str(p.query_value) for v in values])
            if not is_query.any():
                raise ValueError(f"sift: no row has {p.query_column} == {p.query_value!r}")
            if is_query.all():
                raise ValueError(f"sift: every row has {p.query_column} == {p.query_value!r}; the pool is empty")
            targets, pool_rows = x[is_query], np.flatnonzero(~is_query)
        else:
            from tokensift.models.embed import Encoder

            targets = Encoder(p.model, p.device, p.max_length).encode(read_queries(p.queries_file))
            pool_rows = np.arange(len(ids))
        t0 = time.perf_counter()
        args = (x[pool_rows], targets if not p.per_query else list(targets), p.budget, p.lam, p.candidates)
        if p.per_query:
            lists = select_per_query(*args, fast=p.fast, absolute=p.absolute, distinct=p.distinct)
            picks, values = [i for lst in lists for i in lst], None
        else:
            picks, values = search(*args, fast=p.fast, absolute=p.absolute, distinct=p.distinct)
        seconds = time.perf_counter() - t0
        first: dict[int, int] = {}
        for pos, i in enumerate(picks):
            first.setdefault(i, pos)
        kept = list(first)
        return Selection(
            ids=ids[pool_rows[kept]].tolist(),
            scores=[values[first[i]] for i in kept] if values is not None else None,
            stats={
                "targets": len(targets),
                "pool_docs": len(pool_rows),
                "picks": len(picks),
                "kept_docs": len(kept),
                "repeats": len(picks) - len(kept),
                "mode": "per_query" if p.per_query else "target_set",
                "fast": p.fast,
                "distinct": p.distinct,
                "candidates": p.candidates,
                "lam": p.lam,
                "final_value": values[-1] if values else None,
                "seconds": round(seconds, 3),
            },
        )


def read_queries(path: str) -> list[str]:
    """Target texts: one per non-empty line, or the ``text`` field of each line of a ``.jsonl`` file."""
    import json

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"sift: queries_file {path} does not exist")
    texts = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            text = json.loads(line).get("text")
            if not isinstance(text, str):
                raise ValueError(f"sift: {path} line {n} has no string 'text' field")
            texts.append(text)
        else:
            texts.append(line)
    if not texts:
        raise ValueError(f"sift: queries_file {path} holds no text")
    return texts
