"""TokenLoader: exact packing, label weights, rank/worker sharding, seeded shuffling, exact resume."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tokensift.pipeline.loader import TokenLoader

# token id = 1000 * document + position, so every token of the corpus is unique and traceable
DOC_LENGTHS = [[7, 3, 12, 1, 9], [5, 20, 4], [2, 8, 6, 11]]


def _doc(d: int, n: int) -> list[int]:
    return [1000 * d + i for i in range(n)]


def _weights(d: int, n: int) -> list[float]:
    return [0.0] + [round(0.1 * ((d + i) % 7), 1) for i in range(1, n)]


def _tables() -> list[pa.Table]:
    tables, d = [], 0
    for f, lengths in enumerate(DOC_LENGTHS):
        ids = [_doc(d + j, n) for j, n in enumerate(lengths)]
        cols = {"id": [str(d + j) for j in range(len(lengths))], "input_ids": pa.array(ids, pa.list_(pa.int32()))}
        if f != 1:  # shard 1 has no token_weights: its labels weigh 1
            cols["token_weights"] = pa.array([_weights(d + j, n) for j, n in enumerate(lengths)],
                                             pa.list_(pa.float32()))
        tables.append(pa.table(cols))
        d += len(lengths)
    return tables


@pytest.fixture
def snapshot(tmp_path):
    (tmp_path / "data").mkdir()
    for i, t in enumerate(_tables()):
        pq.write_table(t, tmp_path / "data" / f"train-{i:05d}-of-00003.parquet")
    return tmp_path


def _oracle_stream(mask_doc_boundary=True):
    """The unshuffled stream built independently: tokens and the weight of each token as a label."""
    tokens, weights, d = [], [], 0
    for f, lengths in enumerate(DOC_LENGTHS):
        for n in lengths:
            tokens += _doc(d, n)
            w = _weights(d, n) if f != 1 else [1.0] * n
            if mask_doc_boundary:
                w = [0.0] + w[1:]
            weights += w
            d += 1
    return np.array(tokens), np.array(weights, dtype=np.float32)


def _collect(loader, n=None):
    return list(itertools.islice(iter(loader), n))


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in ("input_ids", "labels", "loss_weights"):
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


@pytest.mark.parametrize("mask", [True, False])
def test_packs_the_stream_exactly_with_label_weights(snapshot, mask):
    L, B = 5, 2
    batches = _collect(TokenLoader(snapshot, L, B, shuffle=False, epochs=1, mask_doc_boundary=mask))
    tokens, weights = _oracle_stream(mask)
    n_batches = (len(tokens) - 1) // L // B
    assert len(batches) == n_batches
    inputs = torch.cat([b["input_ids"].reshape(-1) for b in batches]).numpy()
    labels = torch.cat([b["labels"].reshape(-1) for b in batches]).numpy()
    lw = torch.cat([b["loss_weights"].reshape(-1) for b in batches]).numpy()
    n = n_batches * B * L
    np.testing.assert_array_equal(inputs, tokens[:n])
    np.testing.assert_array_equal(labels, tokens[1 : n + 1])
    np.testing.assert_array_equal(lw, weights[1 : n + 1])
    assert batches[0]["input_ids"].dtype == torch.long and batches[0]["loss_weights"].dtype == torch.float32
    # a label that starts a document is predicted across the boundary: masked only when configured
    first_tokens = labels % 1000 == 0
    assert first_tokens.sum() >= 5
    if mask:
        assert (lw[first_tokens] == 0).all()
    else:  # shard 1 (documents 5-7) has no token_weights: even its first tokens weigh 1
        assert (lw[first_tokens & (labels >= 1000 * 5) & (labels < 1000 * 8)] == 1).all()


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_cover_the_stream_with_no_overlap_and_no_gap(snapshot, world_size):
    L, B = 4, 2
    single = _collect(TokenLoader(snapshot, L, B * world_size, seed=3, epochs=2))
    ranks = [_collect(TokenLoader(snapshot, L, B, rank=r, world_size=world_size, seed=3, epochs=2))
             for r in range(world_size)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(single) > 0  # ranks stay in step
    for k, full in enumerate(single):
        # global batch k = sequences [k*B*W, (k+1)*B*W); rank r holds sequences r, r+W, ...
        for r in range(world_size):
            for key in ("input_ids", "labels", "loss_weights"):
                torch.testing.assert_close(ranks[r][k][key], full[key][r::world_size], rtol=0, atol=0)
    labels = np.sort(torch.cat([b["labels"].reshape(-1) for rk in ranks for b in rk]).numpy())
    one_epoch_tokens = sum(map(sum, DOC_LENGTHS))
    assert len(labels) == len(single) * B * world_size * L and len(labels) > one_epoch_tokens
    # each epoch is every document once: no token is a label three times in two epochs
    assert np.bincount(labels).max() <= 2


def test_workers_give_the_same_stream_and_state(snapshot):
    plain = TokenLoader(snapshot, 6, 2, seed=1, epochs=2)
    with_workers = TokenLoader(snapshot, 6, 2, seed=1, epochs=2, num_workers=2)
    _same(_collect(plain), _collect(with_workers))
    assert plain.state_dict() == with_workers.state_dict()


def test_seeded_shuffle_is_reproducible_and_reorders_each_epoch(snapshot):
    tokens_per_epoch = sum(map(sum, DOC_LENGTHS))
    L = tokens_per_epoch - 1  # one sequence = the first epoch (almost)

    def epochs(seed):
        batches = _collect(TokenLoader(snapshot, L, 1, seed=seed, epochs=3))
        return [torch.cat([b["input_ids"][0], b["labels"][0, -1:]]).numpy() for b in batches]

    a, b, c = epochs(0), epochs(0), epochs(1)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert len(a) == 3  # sequence g spans stream[g*L : g*L+L+1]
    epoch0, epoch1 = a[0], np.concatenate([a[1][1:], a[2][1:2]])
    unshuffled, _ = _oracle_stream()
    for epoch in (epoch0, epoch1):
        assert sorted(epoch) == sorted(unshuffled) and not (epoch == unshuffled).all()
    assert not (epoch0 == epoch1).all() and not (epoch0 == c[0]).all()


@pytest.mark.parametrize("workers_after", [0, 2])
def test_resume_continues_at_the_next_token(snapshot, workers_after):
    L, B, k = 5, 3, 4
    full = _collect(TokenLoader(snapshot, L, B, seed=7, epochs=3))
    first = TokenLoader(snapshot, L, B, seed=7, epochs=3)
    head = _collect(first, k)
    state = first.state_dict()
    assert state["sequences"] == k * B
    resumed = TokenLoader(snapshot, L, B, seed=7, epochs=3, num_workers=workers_after)
    resumed.load_state_dict(state)
    _same(head + _collect(resumed), full)
    assert len(full) > k + 5  # crosses epoch boundaries after the resume point


def test_resume_with_another_world_size(snapshot):
    L = 4
    full = _collect(TokenLoader(snapshot, L, 4, seed=2), 6)
    one = TokenLoader(snapshot, L, 4, seed=2)
    _collect(one, 2)  # 8 sequences consumed
    halves = []
    for r in range(2):
        part = TokenLoader(snapshot, L, 2, rank=r, world_size=2, seed=2)
        part.load_state_dict(one.state_dict())
        halves.append(_collect(part, 4))
    for k in range(4):
        merged = torch.stack([halves[r][k]["labels"] for r in range(2)], 1).reshape(4, L)
        torch.testing.assert_close(merged, full[2 + k]["labels"], rtol=0, atol=0)
    odd = TokenLoader(snapshot, L, 3, seed=2)
    with pytest.raises(ValueError, match="not a multiple of the global batch"):
        odd.load_state_dict(one.state_dict())
    with pytest.raises(ValueError, match="seed was 2, now 5"):
        TokenLoader(snapshot, L, 4, seed=5).load_state_dict(one.state_dict())


def test_live_stream_matches_the_snapshot_and_resumes(snapshot):
    tables = _tables()
    from_files = _collect(TokenLoader(snapshot, 5, 2, shuffle=False, epochs=1))
    live = TokenLoader.from_stream(tables, 5, 2, shuffle=False)
    _same(_collect(live), from_files)
    shuffled = TokenLoader.from_stream(lambda: iter(tables), 5, 2, rank=1, world_size=2, seed=4)
    head = _collect(shuffled, 2)
    again = TokenLoader.from_stream(lambda: iter(tables), 5, 2, rank=1, world_size=2, seed=4)
    again.load_state_dict(shuffled.state_dict())
    _same(head + _collect(again), _collect(
        TokenLoader.from_stream(tables, 5, 2, rank=1, world_size=2, seed=4)))


def test_bad_input_names_file_row_and_column(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match="no parquet shards"):
        TokenLoader(tmp_path, 4, 1)
    t = pa.table({"input_ids": pa.array([[1, 2, 3], [4, 5]], pa.list_(pa.int32())),
                  "token_weights": pa.array([[0, 1, 1], [0, 1, 1]], pa.list_(pa.float32()))})
    path = tmp_path / "data" / "train-00000-of-00001.parquet"
    pq.write_table(t, path)
    with pytest.raises(ValueError, match=r"train-00000-of-00001.parquet: row 1 has 2 'input_ids' but 'token_weights' of length 3"):
        _collect(TokenLoader(tmp_path, 2, 1, shuffle=False))
    pq.write_table(pa.table({"text": ["a"]}), path)
    with pytest.raises(ValueError, match="no 'input_ids' column"):
        TokenLoader(tmp_path, 2, 1)
    with pytest.raises(ValueError, match="rank must be in"):
        TokenLoader(tmp_path, 2, 1, rank=2, world_size=2)
