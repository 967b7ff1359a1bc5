"""Bookkeeping of the SIFT ablation (bench/ablate_sift.py) on toy inputs: picks, sequences, answer losses,
paired verdicts, seed folding and the section's tables."""

from __future__ import annotations

import numpy as np

from bench.ablate_sift import (
    answer_loss,
    diagnostics,
    embed_cached,
    fold_seeds,
    in_context,
    nearest,
    paired,
    pick_prompts,
    random_picks,
    section,
)
from tokensift.selectors.sift import select_per_query


def test_pick_prompts_is_fixed_by_id_hash_not_by_order():
    rows = [{"id": f"gsm8k/test/{i:04d}"} for i in range(20)]
    first = pick_prompts(rows, 5)
    assert pick_prompts(rows[::-1], 5) == first
    assert len({r["id"] for r in first}) == 5


def test_nearest_picks_pool_rows_only_in_cosine_order():
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])
    queries = np.array([[1.0, 0.1], [0.1, 1.0]])  # each other's nearest rows must not be picked
    assert nearest(pool, queries, 2) == [[0, 2], [1, 3]]


def test_sift_skips_the_duplicates_that_knn_takes():
    pool = np.array([[1.0, 0.0, 0.0], [0.999, 0.045, 0.0], [0.998, 0.063, 0.0], [0.0, 0.0, 1.0]])
    query = np.array([[1.0, 0.0, 0.3]])  # rows 0-2 are near-copies; row 3 holds the rest of the query
    assert nearest(pool, query, 2) == [[0, 1]]
    assert select_per_query(pool, query, 2, 0.01, distinct=True, use_ray=False) == [[0, 3]]


def test_embeddings_are_cached_by_id(tmp_path, monkeypatch):
    import tokensift.models.embed as embed

    asked = []

    class Fake:
        def encode(self, texts):
            asked.extend(texts)
            return np.array([[len(t), 1.0] for t in texts], np.float32)

    monkeypatch.setattr(embed, "Encoder", Fake)
    cache = tmp_path / "e.npz"
    first = embed_cached(["a", "bb"], ["x", "y"], cache, print)
    again = embed_cached(["ccc", "bb", "a"], ["z", "y", "x"], cache, print)
    assert asked == ["a", "bb", "ccc"]  # only the new id is embedded the second time
    assert first.tolist() == [[1, 1], [2, 1]] and again.tolist() == [[3, 1], [2, 1], [1, 1]]


def test_random_picks_are_distinct_and_seeded():
    a = random_picks(10, 4, seed=1, prompt=2)
    assert a == random_picks(10, 4, seed=1, prompt=2) and len(set(a)) == 4
    assert a != random_picks(10, 4, seed=2, prompt=2)


def test_answer_loss_averages_the_answer_positions():
    seq = in_context([[1, 2], [3]], prompt=[7, 8], answer=[5, 6, 4], sep=[0])
    assert seq == [1, 2, 0, 3, 0, 7, 8, 5, 6, 4]
    losses = np.arange(len(seq) - 1, dtype=np.float32)  # entry t predicts token t + 1
    assert answer_loss(losses, 3) == 7.0  # entries 6, 7, 8 predict 5, 6, 4


def test_paired_verdict_uses_per_prompt_differences():
    base = [1.0, 2.0, 3.0, 4.0]
    assert paired([0.9, 1.9, 2.8, 3.9], base).startswith("better (-0.125, 2 SE = 0.050)")
    assert paired([1.2, 2.0, 3.2, 4.0], base).startswith("no clear difference (+0.100, 2 SE = 0.115)")
    assert paired([1.5], [1.0]) == "higher by 0.500 (1 prompt: no spread)"


def test_fold_seeds_averages_random_per_prompt():
    got = fold_seeds({"knn": [1.0, 2.0], "random/0": [1.0, 3.0], "random/1": [2.0, 5.0]})
    assert got == {"knn": [1.0, 2.0], "random": [1.5, 4.0]}


def test_diagnostics_of_a_toy_selection():
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    d = diagnostics(emb, np.array([1.0, 0.0]), [0, 2, 0], knn=[0, 1, 2], same=np.array([True, False, False]))
    assert d == {"query_cos": 1.0, "pair_cos": 1.0, "same_domain": 2 / 3, "knn_overlap": 2 / 3, "distinct": 2}


def test_section_writes_tables_from_the_data_alone():
    diag = {"query_cos": 0.5, "pair_cos": 0.4, "same_domain": 1.0, "knn_overlap": 1.0, "distinct": 3}
    data = {
        "setting": {"model": "M", "n": 3, "pool_docs": {"math": 5, "instruction": 6}, "per_domain": 2, "encoder": "E",
                    "lam": 0.01, "example_tokens": 8, "prompt_tokens": 8, "answer_tokens": 8, "ttft_per_domain": 1,
                    "lr": 5e-5, "eps": 1e-8},
        "prompts": [{"domain": d} for d in ("math", "math", "instruction", "instruction")],
        "in_context": {"none": [2.0, 2.1, 3.0, 3.2], "sift": [1.0, 1.1, 2.0, 2.1], "knn": [1.2, 1.3, 2.1, 2.2],
                       "random/0": [1.9, 2.0, 2.9, 3.0], "random/1": [1.7, 1.8, 2.8, 3.1]},
        "ttft": {"prompts": [0, 2], "sift": [1.5, 2.5], "knn": [1.6, 2.6], "random/0": [1.9, 2.9]},
        "diagnostics": {"sift": [diag] * 4},
        "seconds": {"embed": 1.0, "select": 0.1, "in_context": 8.0, "ttft_runs": [2.0, 3.0], "total": 60.0},
    }
    text = "\n".join(section(data))
    assert "| sift | 1.550 ± 0.580 | 1.050 ± 0.071 | 2.050 ± 0.071 | better (-0.150, 2 SE = 0.058) |" in text
    assert "| random | 2.400 ± 0.642 |" in text  # seeds folded per prompt first: 1.8, 1.9, 2.85, 3.05
    assert "| knn | 2.100 ± 0.707 | 1.600 ± 0.000 | 2.600 ± 0.000 | — |" in text  # fine-tuned prompts 0 and 2
