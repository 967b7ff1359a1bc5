import numpy as np
import pyarrow as pa
import pytest

from tokensift.selectors.threshold import ScoreThreshold, ThresholdParams


def table(scores, chars, ids=None):
    ids = ids or [f"d{i}" for i in range(len(scores))]
    return pa.table({"id": ids, "s": pa.array(scores, pa.float32()), "n_chars": pa.array(chars, pa.int64())})


def test_char_mass_prefix_is_the_smallest_reaching_top_p():
    # ranking by score: d1 (chars 50), d3 (30), d0 (10), d2 (10); total 100
    t = table([0.5, 0.9, 0.1, 0.7], [10, 50, 10, 30])
    sel = ScoreThreshold(ThresholdParams(column="s", top_p=0.5)).select(t)
    assert sel.ids == ["d1"]  # 50 >= 50
    sel = ScoreThreshold(ThresholdParams(column="s", top_p=0.6)).select(t)
    assert sel.ids == ["d1", "d3"]  # 50 < 60 <= 80
    assert sel.stats["kept_mass"] == 80 and sel.stats["threshold"] == pytest.approx(0.7)


def test_docs_weight_keeps_ceil_and_ties_break_by_id():
    t = table([1.0, 1.0, 1.0, 0.0, 1.0], [1, 1, 1, 1, 1], ids=["e", "b", "d", "a", "c"])
    sel = ScoreThreshold(ThresholdParams(column="s", top_p=0.5, weight="docs")).select(t)
    assert sel.ids == ["b", "c", "d"]  # ceil(2.5) = 3, equal scores ordered by id


def test_exact_regardless_of_row_order():
    rng = np.random.default_rng(0)
    scores, chars = rng.random(1000), rng.integers(1, 500, 1000)
    t = table(scores.tolist(), chars.tolist())
    perm = rng.permutation(1000)
    shuffled = t.take(pa.array(perm))
    p = ThresholdParams(column="s", top_p=0.1)
    a, b = ScoreThreshold(p).select(t), ScoreThreshold(p).select(shuffled)
    assert a.ids == b.ids
    kept = set(a.ids)
    mass = sum(c for i, c in enumerate(chars) if f"d{i}" in kept)
    assert mass >= 0.1 * chars.sum() and mass - chars[int(a.ids[-1][1:])] < 0.1 * chars.sum()


def test_bad_params_and_nan():
    with pytest.raises(ValueError, match="top_p"):
        ScoreThreshold(ThresholdParams(column="s", top_p=0))
    with pytest.raises(ValueError, match="NaN for id 'd1'"):
        ScoreThreshold(ThresholdParams(column="s")).select(table([0.1, float("nan")], [1, 1]))
