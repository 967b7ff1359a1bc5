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
    from tokensift.config import ConfigError
    from tokensift.pipeline.registry import resolve

    with pytest.raises(ConfigError, match="top_p"):
        resolve([{"stage": "score_threshold", "column": "s", "top_p": 0}])
    with pytest.raises(ValueError, match="NaN for id 'd1'"):
        ScoreThreshold(ThresholdParams(column="s")).select(table([0.1, float("nan")], [1, 1]))


def sharded(p, shards, max_gather, monkeypatch):
    """The sharded two-pass over in-memory shards (the runner fans the same calls out as Ray tasks)."""
    from tokensift.selectors import threshold

    monkeypatch.setattr(threshold, "MAX_GATHER", max_gather)
    cols = [threshold.shard_columns(t, p, f"shard {i}") for i, t in enumerate(shards)]

    def gather(cut):
        return [(i[m], s[m], w[m]) for i, s, w in cols for m in [threshold.in_cut_bin(s, cut)]]

    selection, cut = threshold.select_sharded(
        p, lambda level, prefix: [threshold.bin_summary(s, w, level, prefix) for _, s, w in cols], gather)
    before = [i[threshold.before_cut(s, cut, p.descending)] for i, s, _ in cols]
    return set(np.concatenate(before).tolist()) | set(selection.ids), selection


@pytest.mark.parametrize("max_gather", [1_000_000, 7])  # 7: the cut bin is split again, down to exact keys
@pytest.mark.parametrize("weight,descending,top_p", [("chars", True, 0.1), ("docs", False, 0.37), ("docs", True, 1.0)])
def test_sharded_two_pass_keeps_exactly_the_gathered_selection(monkeypatch, max_gather, weight, descending, top_p):
    rng = np.random.default_rng(1)
    n = 3000
    scores = np.concatenate([rng.normal(0, 1, n - 500), np.full(300, 0.25), -rng.random(200) * 1e-30])  # ties, tiny
    t = table(scores.tolist(), rng.integers(0, 400, n).tolist(), ids=[f"d{i:05d}" for i in rng.permutation(n)])
    p = ThresholdParams(column="s", top_p=top_p, weight=weight, descending=descending)
    expected = ScoreThreshold(p).select(t)
    shards = [t.slice(lo, 250) for lo in range(0, n, 250)]
    kept, selection = sharded(p, shards, max_gather, monkeypatch)
    assert kept == set(expected.ids)
    assert {k: v for k, v in selection.stats.items() if k != "threshold"} == {
        k: v for k, v in expected.stats.items() if k != "threshold"}
    assert selection.stats["threshold"] == pytest.approx(expected.stats["threshold"])


def test_sharded_zero_mass_falls_back_to_a_document_count(monkeypatch):
    t = table([0.3, 0.9, 0.1, 0.5], [0, 0, 0, 0])
    p = ThresholdParams(column="s", top_p=0.5)
    kept, _ = sharded(p, [t.slice(0, 2), t.slice(2)], 1_000_000, monkeypatch)
    assert kept == set(ScoreThreshold(p).select(t).ids) == {"d1", "d3"}
