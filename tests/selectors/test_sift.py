"""SIFT against ``activeft==0.1.1`` (the authors' package): same picks on the same unit-norm inputs."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pytest
import torch
from activeft import ActiveDataLoader
from activeft.acquisition_functions.vtl import VTL
from activeft.sift import Dataset, Retriever

from tokensift.pipeline import registry, schema
from tokensift.selectors import sift


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(seed, n=400, d=32, m=1):
    rng = np.random.default_rng(seed)
    pool = _unit(rng.normal(size=(n, d)))
    return pool, _unit(rng.normal(size=(m, d)) + 2 * pool[:m])


def activeft_vtl(pool, queries, n_picks, lam=0.01):
    """activeft's exact VTL over the whole pool (one mini-batch, so no GreeDi split)."""
    torch.manual_seed(0)
    af = VTL(target=torch.tensor(queries), noise_std=lam**0.5, mini_batch_size=len(pool) + 1, num_workers=0)
    idx, values = ActiveDataLoader(dataset=Dataset(torch.tensor(pool)), batch_size=n_picks,
                                   acquisition_function=af).next()
    return idx.tolist(), values.numpy()


def activeft_retriever(pool, queries, n_picks, k, fast=False, absolute=True):
    index = faiss.IndexFlatIP(pool.shape[1])
    index.add(pool)
    retriever = Retriever(index, llambda=0.01, fast=fast, also_query_opposite=absolute, device=torch.device("cpu"))
    values, ids, _, _ = retriever.search(queries, N=n_picks, K=k)
    return ids.tolist(), values


@pytest.mark.parametrize("seed,m", [(0, 1), (1, 1), (2, 3), (3, 40)])  # m = 40 > d: the target set is reduced
def test_exact_greedy_equals_activeft(seed, m):
    pool, queries = _data(seed, m=m)
    want, want_values = activeft_vtl(pool, queries, 25)
    got, values = sift.search(pool, queries, 25)
    assert got == want
    np.testing.assert_allclose(values, want_values, rtol=1e-4, atol=1e-5)


def test_repeats_are_allowed():
    pool = np.eye(4, dtype=np.float32)
    query = _unit(np.array([[1.0, 0.2, 0, 0]], np.float32))
    assert sift.select(pool, query, 4) == activeft_vtl(pool, query, 4)[0] == [0, 1, 0, 0]
    assert sift.select(pool, query, 2, distinct=True) == [0, 1]
    capped = sift.select(pool, query, 3, distinct=True)  # e3, e4 carry no information: 10 steps per doc
    assert len(capped) == 30 and set(capped) == {0, 1}


@pytest.mark.parametrize("absolute", [True, False])
def test_preselection_equals_activeft_retriever(absolute):
    pool, queries = _data(4, m=2)
    want, _ = activeft_retriever(pool, queries, 15, k=60, absolute=absolute)
    assert sift.select(pool, queries, 15, candidates=60, absolute=absolute) == want
    assert sift.select(pool, queries, 15, candidates=60, absolute=not absolute) != want


@pytest.mark.parametrize("seed", [5, 6])
def test_sift_fast_equals_activeft_lazy(seed):
    pool, queries = _data(seed, m=3)
    want, want_values = activeft_retriever(pool, queries, 20, k=120, fast=True)
    got, values = sift.search(pool, queries, 20, candidates=120, fast=True)
    assert got == want
    np.testing.assert_allclose(values, want_values, rtol=1e-4, atol=1e-6)


def test_avoids_the_duplicates_nearest_neighbours_return():
    """Five copies of the nearest document: NN retrieval returns all of them, SIFT one plus new information."""
    rng = np.random.default_rng(7)
    d = 16
    query = _unit(rng.normal(size=(1, d)))[0]
    near = _unit(query + 0.3 * _unit(rng.normal(size=(1, d)))[0][None])[0]
    others = _unit(query + 1.5 * _unit(rng.normal(size=(30, d))))
    noise = _unit(rng.normal(size=(200, d)))
    pool = np.vstack([np.repeat(near[None], 5, 0), others, noise]).astype(np.float32)
    nn = np.argsort(-(pool @ query))[:5]
    assert set(nn) == set(range(5))
    picks = sift.select(pool, query[None], 5)
    assert picks[0] in range(5) and sum(p < 5 for p in set(picks)) == 1

    def posterior_variance(rows):
        x = pool[rows].astype(np.float64)
        kq = x @ query
        return 1 - kq @ np.linalg.solve(x @ x.T + 0.01 * np.eye(len(rows)), kq)

    assert posterior_variance(picks) < posterior_variance(list(nn))


def test_per_query_over_ray_equals_one_by_one(ray_local):
    pool, _ = _data(8, n=300)
    queries = _unit(np.random.default_rng(8).normal(size=(5, 32)))
    got = sift.select_per_query(pool, queries, 6, candidates=50, batch_size=2)
    assert got == [sift.select(pool, q[None], 6, candidates=50) for q in queries]
    assert got[0] == activeft_retriever(pool, queries[:1], 6, k=50)[0]


def _table(pool, domains):
    return pa.table({schema.ID: [f"d{i}" for i in range(len(pool))], "domain": domains,
                     schema.EMBEDDING: schema.embedding_array(pool)})


def test_stage_targets_from_matching_rows():
    pool, _ = _data(9, n=120)
    domains = ["math" if i % 10 == 0 else "news" for i in range(120)]
    spec = registry.get("sift")
    params = registry.validate_params(spec.params, {"budget": 8, "query_column": "domain", "query_value": "math"}, "t")
    sel = spec.cls(params).select(_table(pool, domains))
    rows = [i for i in range(120) if i % 10]
    steps, _ = activeft_vtl(pool[rows], pool[::10], 40)  # the same greedy run further; keep 8 documents
    kept = list(dict.fromkeys(rows[i] for i in steps))[:8]
    assert sel.ids == [f"d{i}" for i in kept]
    picks = sel.stats["picks"]
    assert len(set(steps[:picks])) == 8 and len(set(steps[: picks - 1])) == 7
    assert sel.stats["targets"] == 12 and sel.stats["repeats"] == picks - 8
    assert spec.needs(params) == ["embedding", "domain"]
    params.per_query, params.budget = True, 3
    per_query = spec.cls(params).select(_table(pool, domains))
    lists = [sift.select(pool[rows], q[None], 3, distinct=True) for q in pool[::10]]
    union = [rows[i] for lst in lists for i in lst]
    assert per_query.ids == [f"d{i}" for i in dict.fromkeys(union)]
    assert per_query.stats["picks"] == len(union) and all(len(set(lst)) == 3 for lst in lists)


def test_stage_targets_from_a_file(tmp_path):
    from tokensift.models.embed import Encoder

    texts = ["How many apples are left if I eat two of five?", "A train covers 60 km in 1.5 hours.",
             "The central bank raised interest rates.", "def add(a, b): return a + b"]
    pool = Encoder().encode(texts)
    (tmp_path / "q.txt").write_text("What is 7 times 8?\n\n")
    spec = registry.get("sift")
    params = registry.validate_params(spec.params, {"budget": 1, "queries_file": str(tmp_path / "q.txt")}, "t")
    sel = spec.cls(params).select(_table(pool, ["x"] * 4))
    assert sel.ids == ["d0"] and sel.stats["targets"] == 1


def test_bad_input_errors(tmp_path):
    pool, queries = _data(10, n=20)
    with pytest.raises(ValueError, match="queries have dimension 8"):
        sift.select(pool, queries[:, :8], 3)
    pool[4] = 0
    with pytest.raises(ValueError, match="pool row 4 is zero or not finite"):
        sift.select(pool, queries, 3)
    spec = registry.get("sift")
    with pytest.raises(ValueError, match="exactly one of queries_file or query_column"):
        spec.cls(spec.params())
    params = spec.params(query_column="domain", query_value="math")
    with pytest.raises(ValueError, match="no row has domain == 'math'"):
        spec.cls(params).select(_table(_data(10, n=5)[0], ["news"] * 5))
    (tmp_path / "q.jsonl").write_text('{"text": "ok"}\n{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="q.jsonl line 2 has no string 'text' field"):
        sift.read_queries(str(tmp_path / "q.jsonl"))
