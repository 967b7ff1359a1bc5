"""vote-k: graph-based selective annotation (Su et al., 2022, "Selective Annotation Makes Language Models
Better Few-Shot Learners"; reference ``HKUNLP/icl-selective-annotation``, ``two_steps.fast_votek``).

Graph: embeddings are mean-centred over the pool; every document u "votes" for its k most cosine-similar
documents (the reference takes the k just below u's single most similar row, assumed to be u itself, and
drops u if it appears). Greedy with discount base rho = 10: with c(u) the number of selected documents u
voted for,

    score(v) = sum_{u in voters(v), u not selected} rho^(-c(u)),      pick argmax_v score(v), then c(u) += 1

for every voter u of the pick. Only documents with at least one unselected voter are candidates; ties go to
the first document in the reference's scan order (in-degree descending, then the order in which documents
first received a vote, scanning u = 0..n-1 and each u's neighbours in ascending similarity), and near-ties
are re-scored with the reference's floating-point summation order, so picks equal the reference's.

Differences from the reference: no vote cache (its reloaded JSON has string keys, so selected documents can
be picked again); when no candidate is left, the remaining budget is filled in scan order (the reference
would repeat a pick); in phase 2 the discounts c(u) are updated after every pick (the reference's key
mismatch freezes them after phase 1). The score is maintained incrementally, O(indeg * k) per pick, and
the kNN graph comes from faiss (``tokensift.selectors.knn``), so large pools are practical.

Two-phase vote-k (given a per-document ``confidence``, higher = more confident): phase 1 picks ``phase1``
documents (paper: M/10) by the greedy above; the others are sorted from least to most confident (selected
last, ties by position), cut into buckets of b = floor(0.9 n / (M - phase1)) documents, and each bucket in
turn contributes its highest-scoring document (ties: least confident first). The most confident 10 % is
never bucketed. A shortfall (every bucket exhausted) is filled at random (``seed``), as in the reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from tokensift.pipeline import schema
from tokensift.pipeline.registry import register
from tokensift.pipeline.stage import Selection
from tokensift.selectors.knn import INDEXES, cosine_knn

RHO = 10


@dataclass
class VoteGraph:
    """The vote graph. ``out[u]``: the documents u votes for (ascending similarity, ``-1`` padding);
    ``voters[ptr[v]:ptr[v+1]]``: who voted for v (ascending); ``rank``: the reference's scan order."""

    out: np.ndarray
    ptr: np.ndarray
    voters: np.ndarray
    indeg: np.ndarray
    rank: np.ndarray

    def voters_of(self, v: int) -> np.ndarray:
        return self.voters[self.ptr[v] : self.ptr[v + 1]]


def build_graph(embeddings: np.ndarray, k: int = 150, center: bool = True, index: str = "flat",
                **knn_options) -> VoteGraph:
    """Vote graph of ``embeddings`` (``n x d``): every row votes for its ``k`` nearest rows by cosine."""
    x = np.asarray(embeddings)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"votek: embeddings must be an n x d array with n >= 2, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"votek: embeddings row {int(np.flatnonzero(~np.isfinite(x).all(1))[0])} is not finite")
    if k < 1:
        raise ValueError(f"votek: k must be >= 1, got {k}")
    if center:
        x = x - x.mean(0, dtype=np.float64).astype(x.dtype if x.dtype.kind == "f" else np.float64)
    n = len(x)
    k = min(k, n - 1)
    _, ids = cosine_knn(x, k + 1, index=index, **knn_options)
    out = ids[:, :0:-1].astype(np.int32)  # drop the single most similar row, ascending similarity
    del ids
    out[out == np.arange(n, dtype=np.int32)[:, None]] = -1
    flat = out.ravel()
    valid = flat >= 0
    dst = flat[valid]
    src = np.repeat(np.arange(n, dtype=np.int32), k)[valid]
    indeg = np.bincount(dst, minlength=n)
    first = np.arange(len(dst), len(dst) + n)  # never-voted documents go last, by position
    seen, at = np.unique(dst, return_index=True)
    first[seen] = at
    rank = np.empty(n, np.int64)
    rank[np.lexsort((first, -indeg))] = np.arange(n)
    voters = src[np.argsort(dst, kind="stable")]
    ptr = np.concatenate([[0], np.cumsum(indeg)])
    return VoteGraph(out=out, ptr=ptr, voters=voters, indeg=indeg, rank=rank)


class _Greedy:
    """Incremental vote-k scores: ``score[v]`` is -inf once v is selected or has no unselected voter."""

    def __init__(self, graph: VoteGraph, max_picks: int):
        self.g = graph
        self.discount = np.array([float(RHO) ** -c for c in range(max_picks + 2)])
        self.c = np.zeros(len(graph.indeg), np.int64)
        self.selected = np.zeros(len(graph.indeg), bool)
        self.live = graph.indeg.copy()
        self.score = np.where(graph.indeg > 0, graph.indeg.astype(np.float64), -np.inf)

    def reference_score(self, v: int) -> float:
        """score(v) summed in the reference's order (voters ascending, left to right); 0 without voters."""
        u = self.g.voters_of(v)
        terms = self.discount[self.c[u[~self.selected[u]]]]
        return float(np.cumsum(terms)[-1]) if len(terms) else 0.0

    def best(self) -> tuple[int, float] | None:
        """The reference's arg-max (ties and near-ties resolved with its arithmetic and scan order)."""
        top = self.score.max()
        if top == -np.inf:
            return None
        tied = np.flatnonzero(self.score >= top - 1e-9 * max(1.0, top))
        if len(tied) == 1:
            return int(tied[0]), float(top)
        exact = np.array([self.reference_score(v) for v in tied])
        best = tied[exact == exact.max()]
        v = int(best[np.argmin(self.g.rank[best])])
        return v, float(exact.max())

    def pick(self, s: int) -> None:
        """Select ``s``: it stops voting, and every voter of ``s`` gets its discount raised."""
        g, score = self.g, self.score
        self.selected[s] = True
        score[s] = -np.inf
        w = g.out[s][g.out[s] >= 0]
        score[w] -= self.discount[self.c[s]]
        self.live[w] -= 1
        touched = [w]
        u = g.voters_of(s)
        old = self.c[u]
        self.c[u] += 1
        keep = ~self.selected[u]
        u, old = u[keep], old[keep]
        if len(u):
            nb = g.out[u]
            ok = nb >= 0
            delta = np.broadcast_to((self.discount[old] - self.discount[old + 1])[:, None], nb.shape)
            np.subtract.at(score, nb[ok], delta[ok])
            touched.append(nb[ok])
        touched = np.concatenate(touched)
        score[touched[self.live[touched] == 0]] = -np.inf


def _run(state: _Greedy, budget: int, picks: list[int], gains: list[float]) -> None:
    """Greedy picks until ``budget``; then the unselected rest in the reference's scan order (gain 0)."""
    while len(picks) < budget:
        best = state.best()
        if best is None:
            rest = np.flatnonzero(~state.selected)
            for v in rest[np.argsort(state.g.rank[rest])][: budget - len(picks)]:
                picks.append(int(v))
                gains.append(0.0)
                state.pick(int(v))
            return
        picks.append(best[0])
        gains.append(best[1])
        state.pick(best[0])


def fast_votek(graph: VoteGraph, budget: int) -> tuple[list[int], list[float]]:
    """Phase-1 vote-k: ``budget`` picks in selection order and the score each had when picked."""
    _check_budget(budget, len(graph.indeg))
    picks: list[int] = []
    gains: list[float] = []
    _run(_Greedy(graph, budget), budget, picks, gains)
    return picks, gains


def two_phase_votek(graph: VoteGraph, budget: int, confidence: np.ndarray, phase1: int | None = None,
                    seed: int = 0) -> tuple[list[int], list[float]]:
    """Full vote-k: ``phase1`` greedy picks (default ``max(1, budget // 10)``), then one pick per
    confidence bucket (see the module docstring)."""
    n = len(graph.indeg)
    _check_budget(budget, n)
    conf = np.asarray(confidence, dtype=np.float64)
    if conf.shape != (n,):
        raise ValueError(f"votek: confidence has shape {conf.shape}, expected ({n},)")
    if np.isnan(conf).any():
        raise ValueError(f"votek: confidence is NaN at row {int(np.flatnonzero(np.isnan(conf))[0])}")
    m1 = min(budget, max(1, budget // 10) if phase1 is None else phase1)
    if m1 < 1:
        raise ValueError(f"votek: phase1 must be >= 1, got {phase1}")
    state = _Greedy(graph, budget)
    picks: list[int] = []
    gains: list[float] = []
    _run(state, m1, picks, gains)
    if budget == len(picks):
        return picks, gains
    size = int(n * 0.9 / (budget - len(picks)))
    if size < 1:
        raise ValueError(f"votek: two-phase needs budget - phase1 <= 0.9 n; got {budget} - {m1} with n = {n}")
    order = np.lexsort((np.arange(n), conf, state.selected))
    start = 0
    while len(picks) < budget and start < n:
        bucket = order[start : start + size]
        start += size
        cands = bucket[~state.selected[bucket]]
        if len(cands) == 0:
            continue
        scores = np.array([state.reference_score(v) for v in cands])
        v = int(cands[np.argmax(scores)])
        picks.append(v)
        gains.append(float(scores.max()))
        state.pick(v)
    if len(picks) < budget:
        rest = np.flatnonzero(~state.selected)
        extra = np.random.default_rng(seed).choice(rest, budget - len(picks), replace=False)
        picks += [int(v) for v in extra]
        gains += [0.0] * len(extra)
    return picks, gains


def coverage(graph: VoteGraph, picks: list[int]) -> float:
    """Share of documents that are selected or have a selected document among their k neighbours."""
    sel = np.zeros(len(graph.indeg) + 1, bool)  # last slot: the -1 padding
    sel[np.asarray(picks, dtype=np.int64)] = True
    return float((sel[:-1] | sel[graph.out].any(1)).mean())


def select(embeddings: np.ndarray, budget: int, k: int = 150, center: bool = True, *,
           confidence: np.ndarray | None = None, phase1: int | None = None, index: str = "flat",
           seed: int = 0) -> list[int]:
    """vote-k picks: indices into ``embeddings`` (``n x d``) in selection order.

    Fast vote-k without ``confidence``; the two-phase method with it. ``index`` is the kNN index
    (``flat`` exact; ``ivf``/``hnsw`` approximate, for very large pools).
    """
    _check_budget(budget, len(embeddings))
    graph = build_graph(embeddings, k, center, index)
    if confidence is None:
        return fast_votek(graph, budget)[0]
    return two_phase_votek(graph, budget, confidence, phase1, seed)[0]


def _check_budget(budget: int, n: int) -> None:
    if not 1 <= budget <= n:
        raise ValueError(f"votek: budget must be in [1, {n}] (the number of documents), got {budget}")


@dataclass
class VoteKParams:
    """Args:
    budget: documents to select (M).
    k: neighbours each document votes for (paper and reference: 150).
    center: subtract the pool mean before cosine similarity (reference: yes).
    column: the embedding column.
    confidence_column: per-document confidence (higher = more confident); enables two-phase vote-k.
    phase1: phase-1 picks of two-phase vote-k (``None``: budget // 10, the paper's M/10).
    index: kNN index: ``flat`` (exact), ``ivf`` or ``hnsw`` (approximate, very large pools).
    nprobe: IVF cells visited per query.
    seed: seed of the two-phase random fill.
    """

    budget: int = field(default=100, metadata={"ge": 1})
    k: int = field(default=150, metadata={"ge": 1})
    center: bool = True
    column: str = schema.EMBEDDING
    confidence_column: str | None = None
    phase1: int | None = field(default=None, metadata={"ge": 1})
    index: str = field(default="flat", metadata={"choices": INDEXES})
    nprobe: int = field(default=16, metadata={"ge": 1})
    seed: int = 0


@register("votek", kind="select", params=VoteKParams)
class VoteK:
    """Select stage: vote-k over the gathered embeddings; ids in selection order, gains as scores."""

    def __init__(self, params: VoteKParams):
        self.p = params

    @classmethod
    def needs(cls, p: VoteKParams) -> list[str]:
        return [p.column] + ([p.confidence_column] if p.confidence_column else [])

    def select(self, table: pa.Table) -> Selection:
        p = self.p
        ids = table.column(schema.ID).to_pylist()
        x = schema.embedding_matrix(table.column(p.column))
        _check_budget(p.budget, len(ids))
        t0 = time.perf_counter()
        options = {"nprobe": p.nprobe} if p.index == "ivf" else {}
        graph = build_graph(x, p.k, p.center, p.index, **options)
        t1 = time.perf_counter()
        if p.confidence_column:
            conf = table.column(p.confidence_column).to_numpy(zero_copy_only=False).astype(np.float64)
            if np.isnan(conf).any():
                bad = ids[int(np.flatnonzero(np.isnan(conf))[0])]
                raise ValueError(f"votek: column {p.confidence_column!r} is null or NaN for id {bad!r}")
            picks, gains = two_phase_votek(graph, p.budget, conf, p.phase1, p.seed)
        else:
            picks, gains = fast_votek(graph, p.budget)
        t2 = time.perf_counter()
        return Selection(
            ids=[ids[i] for i in picks],
            scores=gains,
            stats={
                "method": "two_phase" if p.confidence_column else "fast_votek",
                "budget": p.budget,
                "total_docs": len(ids),
                "k": int(graph.out.shape[1]),
                "index": p.index,
                "coverage": coverage(graph, picks),
                "max_indegree": int(graph.indeg.max()),
                "graph_seconds": round(t1 - t0, 3),
                "greedy_seconds": round(t2 - t1, 3),
            },
        )
