"""vote-k against a slow O(n^2) re-derivation of the reference ``fast_votek`` (HKUNLP/icl-selective-annotation).

``fast_votek_reference`` follows the reference step by step (sklearn-style cosine of all rows against one
row at a time, ``argsort()[-k-1:-1]``, votes sorted by in-degree, full re-scoring every round with
``10 ** -count``), without its vote cache. ``bench/votek.py`` times it as the anchor.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest

from tokensift.pipeline import registry, schema
from tokensift.selectors import votek
from tokensift.selectors.knn import cosine_knn


def cosine_similarity(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """As ``sklearn.metrics.pairwise.cosine_similarity``: both sides row-normalised, then ``x @ y.T``."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (y / np.linalg.norm(y, axis=1, keepdims=True)).T


def votes_reference(embeddings: np.ndarray, k: int) -> dict[int, list[int]]:
    """Row by row: similarity to every row, ``argsort()[-k-1:-1]``, each row votes for those but itself."""
    vote_stat: dict[int, list[int]] = {}
    for i in range(len(embeddings)):
        scores = np.sum(cosine_similarity(embeddings, embeddings[i].reshape(1, -1)), axis=1)
        for idx in np.argsort(scores).tolist()[-k - 1 : -1]:
            if idx != i:
                vote_stat.setdefault(idx, []).append(i)
    return vote_stat


def fast_votek_reference(embeddings: np.ndarray, select_num: int, k: int) -> list[int]:
    """The reference phase-1 greedy, O(n^2 d) graph and O(M n k) full re-scoring per pick."""
    vote_stat = votes_reference(embeddings, k)
    votes = sorted(vote_stat.items(), key=lambda kv: len(kv[1]), reverse=True)
    selected: list[int] = []
    chosen: set[int] = set()
    times: dict[int, int] = defaultdict(int)
    while len(selected) < select_num:
        scores: dict[int, float] = {}
        for idx, voters in votes:
            if idx in chosen:
                scores[idx] = -100
                continue
            for u in voters:
                if u not in chosen:
                    scores[idx] = scores.get(idx, 0) + 10 ** (-times[u])
        best = max(scores.items(), key=lambda kv: kv[1])[0]
        selected.append(best)
        chosen.add(best)
        for u in vote_stat[best]:
            times[u] += 1
    return selected


def two_phase_reference(embeddings, budget, k, confidence, phase1):
    """Reference phase 2 (buckets of floor(0.9 n / (M - phase1)) by ascending confidence), with the
    discounts updated after every phase-2 pick (the reference's string-key bug fixed)."""
    n = len(embeddings)
    vote_stat = votes_reference(embeddings, k)
    selected = fast_votek_reference(embeddings, phase1, k)
    times: dict[int, int] = defaultdict(int)
    for prev in selected:
        for u in vote_stat[prev]:
            times[u] += 1
    order = sorted(range(n), key=lambda i: (i in selected, confidence[i]))
    inter = int(n * 0.9 / (budget - len(selected)))
    t = 0
    while len(selected) < budget and t * inter < n:
        scores: dict[int, float] = {}
        for idx in order[t * inter : (t + 1) * inter]:
            if idx in selected:
                continue
            scores[idx] = 0
            for u in vote_stat.get(idx, []):
                if u not in selected:
                    scores[idx] += 10 ** (-times[u])
        best = max(scores.items(), key=lambda kv: kv[1])[0]
        selected.append(best)
        for u in vote_stat.get(best, []):
            times[u] += 1
        t += 1
    return selected


def _centred(seed: int, n: int, d: int, clusters: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(clusters, size=n)] + 0.7 * rng.normal(size=(n, d))
    return x - x.mean(0)


@pytest.mark.parametrize(
    "seed,n,d,k,budget",
    [(0, 300, 16, 20, 10), (1, 400, 32, 30, 40), (2, 1000, 64, 150, 10), (3, 250, 8, 10, 60), (4, 600, 24, 150, 25),
     (100, 200, 8, 10, 120)],  # the last one has near-ties that only the reference's float summation order breaks
)
def test_same_picks_as_reference(seed, n, d, k, budget):
    x = _centred(seed, n, d)
    assert votek.select(x, budget, k=k) == fast_votek_reference(x, budget, k)


def test_two_phase_matches_reference_buckets():
    x = _centred(5, 300, 16)
    conf = np.random.default_rng(5).normal(size=300).round(1)  # ties: least confident first, then position
    got = votek.select(x, 30, k=20, confidence=conf, phase1=3)
    assert got == two_phase_reference(x, 30, 20, conf, 3)
    assert len(set(got)) == 30
    assert got[:3] == fast_votek_reference(x, 3, 20)


def test_covers_more_of_the_knn_graph_than_random():
    x = _centred(6, 800, 32, clusters=20)
    graph = votek.build_graph(x, k=30)
    picks, gains = votek.fast_votek(graph, 20)
    rng = np.random.default_rng(6)
    random_cov = [votek.coverage(graph, rng.choice(800, 20, replace=False)) for _ in range(20)]
    assert votek.coverage(graph, picks) > max(random_cov)
    assert gains[0] == graph.indeg.max() and np.all(np.diff(gains) <= 0)


def test_sharded_exact_knn_equals_brute_force_and_ivf_recall():
    x = _centred(7, 500, 16)
    sims, ids = cosine_knn(x, 12, shard_rows=64, query_rows=50, refine=0)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    brute = np.argsort(-(unit @ unit.T), axis=1, kind="stable")[:, :12]
    assert (ids == brute).mean() > 0.999
    np.testing.assert_allclose(sims, np.take_along_axis(unit @ unit.T, brute, 1), atol=1e-5)
    _, approx = cosine_knn(x, 12, index="ivf", nlist=16, nprobe=4)
    recall = np.mean([len(set(a) & set(b)) / 12 for a, b in zip(approx, brute, strict=True)])
    assert recall > 0.8
    assert len(votek.select(x, 10, k=12, index="hnsw")) == 10


def test_exhausted_candidates_fill_without_repeats():
    x = _centred(8, 30, 4)
    picks = votek.select(x, 30, k=3)
    assert sorted(picks) == list(range(30))


def test_bad_input_errors():
    x = _centred(9, 50, 4)
    with pytest.raises(ValueError, match="budget must be in"):
        votek.select(x, 51)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="row 3 is not finite"):
        votek.select(x, 5)
    with pytest.raises(ValueError, match="confidence is NaN at row 2"):
        votek.select(_centred(9, 50, 4), 5, k=5, confidence=[0, 1, np.nan] + [0] * 47)


def test_select_stage_returns_ids_and_stats():
    x = _centred(10, 200, 16)
    table = pa.table({schema.ID: [f"d{i}" for i in range(200)], schema.EMBEDDING: schema.embedding_array(x)})
    spec = registry.get("votek")
    params = registry.validate_params(spec.params, {"budget": 12, "k": 20}, "test")
    sel = spec.cls(params).select(table)
    x32 = x.astype(np.float32)  # the stage centres float32 embeddings in float32, as the reference does
    expected = fast_votek_reference((x32 - x32.mean(0, dtype=np.float64).astype(np.float32)).astype(np.float64), 12, 20)
    assert sel.ids == [f"d{i}" for i in expected]
    assert sel.stats["budget"] == 12 and 0 < sel.stats["coverage"] <= 1 and len(sel.scores) == 12
    assert spec.needs(params) == ["embedding"]


def test_two_phase_stage_uses_the_confidence_column():
    x = _centred(11, 150, 8)
    conf = np.random.default_rng(11).normal(size=150)
    table = pa.table({schema.ID: [f"d{i}" for i in range(150)], schema.EMBEDDING: schema.embedding_array(x),
                      "conf": conf})
    spec = registry.get("votek")
    params = registry.validate_params(spec.params, {"budget": 12, "k": 10, "confidence_column": "conf"}, "t")
    sel = spec.cls(params).select(table)
    graph = votek.build_graph(schema.embedding_matrix(table.column(schema.EMBEDDING)), 10)
    assert sel.ids == [f"d{i}" for i in votek.two_phase_votek(graph, 12, conf, phase1=1)[0]]
    assert sel.stats["method"] == "two_phase" and spec.needs(params) == ["embedding", "conf"]
    conf[7] = np.nan
    with pytest.raises(ValueError, match="'conf' is null or NaN for id 'd7'"):
        spec.cls(params).select(table.set_column(2, "conf", pa.array(conf)))
