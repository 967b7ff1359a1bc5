"""TokenLoader: exact packing, label weights, prompt mask, document positions, rank/worker sharding,
seeded shuffling, exact resume, the manifest as the truth, and row-group reads per rank."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tokensift.pipeline import fs
from tokensift.pipeline.loader import Order, TokenLoader
from tokensift.pipeline.shards import write_manifest

# token id = 1000 * document + position, so every token of the corpus is unique and traceable
DOC_LENGTHS = [[7, 3, 12, 1, 9], [5, 20, 4], [2, 8, 6, 11]]
PROMPT = 2  # the first two tokens of every document of shards with a loss_mask are prompt
KEYS = ("input_ids", "labels", "loss_weights", "loss_mask", "position_ids", "document_ids")


def _doc(d: int, n: int) -> list[int]:
    return [1000 * d + i for i in range(n)]


def _weights(d: int, n: int) -> list[float]:
    return [0.0] + [round(0.1 * ((d + i) % 7), 1) for i in range(1, n)]


def _tables() -> list[pa.Table]:
    tables, d = [], 0
    for f, lengths in enumerate(DOC_LENGTHS):
        ids = [_doc(d + j, n) for j, n in enumerate(lengths)]
        cols = {"id": [str(d + j) for j in range(len(lengths))], "input_ids": pa.array(ids, pa.list_(pa.int32()))}
        if f != 1:  # shard 1 has no token_weights (its labels weigh 1) and no loss_mask (all response)
            cols["token_weights"] = pa.array([_weights(d + j, n) for j, n in enumerate(lengths)],
                                             pa.list_(pa.float32()))
            cols["loss_mask"] = pa.array([[int(i >= PROMPT) for i in range(n)] for n in lengths], pa.list_(pa.int8()))
        tables.append(pa.table(cols))
        d += len(lengths)
    return tables


def write_snapshot(root, tables, row_group_size=None, row_groups=True):
    """Shards ``data/train-*.parquet`` and their manifest (without per-row-group token counts unless ``row_groups``)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(tables):
        pq.write_table(t, root / "data" / f"train-{i:05d}-of-{len(tables):05d}.parquet", row_group_size=row_group_size)
    manifest = write_manifest(root)
    if not row_groups:
        for shard in manifest["shards"]:
            shard.pop("row_groups", None)
        (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def snapshot(tmp_path):
    return write_snapshot(tmp_path, _tables())


def _oracle_stream(mask_doc_boundary=True):
    """The unshuffled stream built independently: tokens, each token's weight as a label, its loss mask."""
    tokens, weights, masks, d = [], [], [], 0
    for f, lengths in enumerate(DOC_LENGTHS):
        for n in lengths:
            tokens += _doc(d, n)
            w = _weights(d, n) if f != 1 else [1.0] * n
            if mask_doc_boundary:
                w = [0.0] + w[1:]
            weights += w
            masks += [int(i >= PROMPT) for i in range(n)] if f != 1 else [1] * n
            d += 1
    return np.array(tokens), np.array(weights, dtype=np.float32), np.array(masks)


def _collect(loader, n=None):
    return list(itertools.islice(iter(loader), n))


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in KEYS:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


def _check_documents(batch: dict) -> None:
    """position_ids / document_ids against the token ids (position in document = id % 1000)."""
    for ids, pos, doc in zip(batch["input_ids"].numpy(), batch["position_ids"].numpy(),
                             batch["document_ids"].numpy(), strict=True):
        starts = ids % 1000 == 0
        starts[0] = True  # a row starts a document for attention
        index = np.arange(len(ids))
        np.testing.assert_array_equal(pos, index - np.maximum.accumulate(np.where(starts, index, 0)))
        np.testing.assert_array_equal(doc, np.cumsum(starts) - 1)
        first = np.argmax(starts[1:]) + 1 if starts[1:].any() else len(ids)
        np.testing.assert_array_equal(pos[first:], ids[first:] % 1000)  # documents begun in the row: true position


def test_the_lane_order_is_a_permutation_of_the_sequences():
    """Every position maps to a distinct sequence; all but the last window's remainder are used; a lane's
    sequences are consecutive within its window."""
    for sequences, lanes, rounds in itertools.product([0, 1, 7, 40, 97], [1, 3, 8], [1, 2, 5]):
        order = Order(lanes, rounds, sequences)
        got = [order.sequence(p) for p in range(order.positions)]
        seqs = [g for g, _ in got]
        assert len(set(seqs)) == len(seqs) and all(0 <= g < sequences for g in seqs)
        assert sequences - len(seqs) < lanes
        for lane in range(lanes):
            mine = [g for g, c in got if c == lane]
            assert all(b - a == 1 for a, b in zip(mine, mine[1:], strict=False) if b // (lanes * rounds) == a // (lanes * rounds))


@pytest.mark.parametrize("mask", [True, False])
def test_packs_the_stream_exactly_with_label_weights_and_prompt_mask(snapshot, mask):
    L, B = 5, 2
    batches = _collect(TokenLoader(snapshot, L, B, shuffle=False, epochs=1, mask_doc_boundary=mask, lanes=1))
    tokens, weights, masks = _oracle_stream(mask)
    n_batches = (len(tokens) - 1) // L // B
    assert len(batches) == n_batches
    flat = {k: torch.cat([b[k].reshape(-1) for b in batches]).numpy() for k in KEYS}
    n = n_batches * B * L
    np.testing.assert_array_equal(flat["input_ids"], tokens[:n])
    np.testing.assert_array_equal(flat["labels"], tokens[1 : n + 1])
    np.testing.assert_array_equal(flat["loss_weights"], weights[1 : n + 1])
    np.testing.assert_array_equal(flat["loss_mask"], masks[1 : n + 1])
    assert batches[0]["input_ids"].dtype == torch.long and batches[0]["loss_weights"].dtype == torch.float32
    for b in batches:
        _check_documents(b)
    labels = flat["labels"]
    assert 0 < flat["loss_mask"].sum() < n and (flat["loss_mask"][(labels % 1000 < PROMPT) & (labels >= 8000)] == 0).all()
    # a label that starts a document is predicted across the boundary: masked only when configured
    first_tokens = labels % 1000 == 0
    assert first_tokens.sum() >= 5
    if mask:
        assert (flat["loss_weights"][first_tokens] == 0).all()
    else:  # shard 1 (documents 5-7) has no token_weights: even its first tokens weigh 1
        assert (flat["loss_weights"][first_tokens & (labels >= 1000 * 5) & (labels < 1000 * 8)] == 1).all()


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_cover_the_stream_with_no_overlap_and_no_gap(snapshot, world_size):
    L, B = 4, 2
    single = _collect(TokenLoader(snapshot, L, B * world_size, seed=3, epochs=2))
    ranks = [_collect(TokenLoader(snapshot, L, B, rank=r, world_size=world_size, seed=3, epochs=2))
             for r in range(world_size)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(single) > 0  # ranks stay in step
    for k, full in enumerate(single):
        # global batch k = positions [k*B*W, (k+1)*B*W) of the order; rank r holds B of them from r*B
        for key in KEYS:
            torch.testing.assert_close(torch.cat([ranks[r][k][key] for r in range(world_size)]), full[key], rtol=0, atol=0)
        _check_documents(full)
    labels = np.sort(torch.cat([b["labels"].reshape(-1) for rk in ranks for b in rk]).numpy())
    one_epoch_tokens = sum(map(sum, DOC_LENGTHS))
    assert len(labels) == len(single) * B * world_size * L and len(labels) > one_epoch_tokens
    # each epoch is every document once: no token is a label three times in two epochs
    assert np.bincount(labels).max() <= 2


def test_workers_give_the_same_stream_and_state(snapshot):
    plain = TokenLoader(snapshot, 6, 2, seed=1, epochs=2, lanes=4)
    with_workers = TokenLoader(snapshot, 6, 2, seed=1, epochs=2, num_workers=2, lanes=4)
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
    unshuffled, _, _ = _oracle_stream()
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
    assert state["sequences"] == k * B and state["lanes"] == B
    resumed = TokenLoader(snapshot, L, B, seed=7, epochs=3, num_workers=workers_after)
    resumed.load_state_dict(state)  # the saved lanes win over this loader's default (B * workers)
    _same(head + _collect(resumed), full)
    assert len(full) > k + 5  # crosses epoch boundaries after the resume point


@pytest.mark.parametrize(("batch", "world"), [(2, 2), (1, 2), (8, 1)])
def test_resume_with_another_world_size(snapshot, batch, world):
    L = 4
    full = _collect(TokenLoader(snapshot, L, 4, seed=2, epochs=2))
    one = TokenLoader(snapshot, L, 4, seed=2, epochs=2)
    _collect(one, 2)  # 8 sequences consumed
    parts = []
    for r in range(world):
        part = TokenLoader(snapshot, L, batch, rank=r, world_size=world, seed=2, epochs=2)
        part.load_state_dict(one.state_dict())
        parts.append(_collect(part))
    # position order after the resume point: global batch k of the new world is ranks' batches k in rank order
    resumed = torch.cat([torch.cat([parts[r][k]["labels"] for r in range(world)]) for k in range(len(parts[0]))])
    expected = torch.cat([b["labels"] for b in full[2:]])
    torch.testing.assert_close(resumed, expected[: len(resumed)], rtol=0, atol=0)
    assert len(expected) - len(resumed) < batch * world  # only a final incomplete global batch is left out


def test_resume_refuses_what_cannot_continue(snapshot):
    one = TokenLoader(snapshot, 4, 4, seed=2)
    _collect(one, 2)
    with pytest.raises(ValueError, match="not a multiple of the global batch"):
        TokenLoader(snapshot, 4, 3, seed=2).load_state_dict(one.state_dict())
    with pytest.raises(ValueError, match="seed was 2, now 5"):
        TokenLoader(snapshot, 4, 4, seed=5).load_state_dict(one.state_dict())
    old = {k: v for k, v in one.state_dict().items() if k != "lanes"}
    with pytest.raises(ValueError, match="no 'lanes'"):
        TokenLoader(snapshot, 4, 4, seed=2).load_state_dict(old)


def test_live_stream_matches_the_snapshot_and_resumes(snapshot):
    tables = _tables()
    from_files = _collect(TokenLoader(snapshot, 5, 2, shuffle=False, epochs=1, lanes=1))
    live = TokenLoader.from_stream(tables, 5, 2, shuffle=False)
    _same(_collect(live), from_files)
    shuffled = TokenLoader.from_stream(lambda: iter(tables), 5, 2, rank=1, world_size=2, seed=4)
    head = _collect(shuffled, 2)
    again = TokenLoader.from_stream(lambda: iter(tables), 5, 2, rank=1, world_size=2, seed=4)
    again.load_state_dict(shuffled.state_dict())
    _same(head + _collect(again), _collect(
        TokenLoader.from_stream(tables, 5, 2, rank=1, world_size=2, seed=4)))


def test_reads_through_a_filesystem_uri_and_without_row_group_counts(tmp_path, snapshot):
    expected = _collect(TokenLoader(snapshot, 4, 2, seed=5, epochs=2))
    _same(_collect(TokenLoader(f"file://{snapshot}", 4, 2, seed=5, epochs=2)), expected)
    bare = write_snapshot(tmp_path / "bare", _tables(), row_groups=False)  # token counts from the input_ids column
    _same(_collect(TokenLoader(bare, 4, 2, seed=5, epochs=2)), expected)


def test_reads_a_snapshot_on_s3(s3_server, snapshot):
    """The same batches from the S3-compatible server as from local disk; the manifest is checked there too."""
    uri = s3_server("loader/snap")
    filesystem, inner = fs.resolve(uri)
    for path in sorted((snapshot / "data").glob("*.parquet")):
        filesystem.create_dir(f"{inner}/data")
        with filesystem.open_output_stream(f"{inner}/data/{path.name}") as f:
            f.write(path.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"s3://tokensift-test/loader/snap: not a tokensift snapshot"):
        TokenLoader(uri, 4, 2)
    with filesystem.open_output_stream(f"{inner}/manifest.json") as f:
        f.write((snapshot / "manifest.json").read_bytes())
    _same(_collect(TokenLoader(uri, 4, 2, rank=1, world_size=2, seed=5, epochs=2, verify=True)),
          _collect(TokenLoader(snapshot, 4, 2, rank=1, world_size=2, seed=5, epochs=2)))
    filesystem.delete_file(f"{inner}/data/train-00002-of-00003.parquet")
    with pytest.raises(FileNotFoundError, match="s3://tokensift-test/loader/snap/data/train-00002-of-00003.parquet: listed"):
        TokenLoader(uri, 4, 2)


def test_a_rank_reads_only_the_row_groups_of_its_sequences(tmp_path, monkeypatch):
    """World size 8: each rank reads at most 1.25x its share of the tokens, and the ranks cover the epoch;
    the two DataLoader workers of a rank split its reads instead of both reading them."""
    rng = np.random.default_rng(0)
    tables, d = [], 0
    for _ in range(4):  # 4 shards x 40 row groups x 5 documents
        lengths = rng.integers(4, 25, 200)
        tables.append(pa.table({"input_ids": pa.array([_doc(d + j, n) for j, n in enumerate(lengths)],
                                                       pa.list_(pa.int32()))}))
        d += len(lengths)
    snap = write_snapshot(tmp_path, tables, row_group_size=5)
    total = sum(len(x) for t in tables for x in t.column("input_ids").to_pylist())
    read, original = [], pq.ParquetFile.read_row_group

    def counting(self, i, *args, **kwargs):
        table = original(self, i, *args, **kwargs)
        read.append(sum(len(x) for x in table.column("input_ids").to_pylist()))
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    W, L, labels = 8, 16, []
    for r in range(W):
        read.clear()
        batches = _collect(TokenLoader(snap, L, 1, rank=r, world_size=W, seed=1, epochs=1))
        labels += [b["labels"] for b in batches]
        assert sum(read) <= 1.25 * total / W, (r, sum(read), total / W)
    labels = torch.cat(labels).reshape(-1).numpy()
    assert len(np.unique(labels)) == len(labels) > 0.97 * total  # no overlap; the gap is the last rounds
    loader = TokenLoader(snap, L, 1, rank=3, world_size=W, seed=1, epochs=1, num_workers=2)
    for worker in range(2):  # what worker w of 2 makes inside a DataLoader: the rank's batches w, w+2, ...
        read.clear()
        assert len(list(loader._batches_from(worker, 2))) > 0
        assert sum(read) <= 1.25 * total / W / 2, (worker, sum(read), total / W / 2)


def test_manifest_is_the_truth(tmp_path, snapshot):
    (tmp_path / "plain" / "data").mkdir(parents=True)
    pq.write_table(_tables()[0], tmp_path / "plain" / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(FileNotFoundError, match=r"not a tokensift snapshot \(no manifest.json\)"):
        TokenLoader(tmp_path / "plain", 4, 1)
    (tmp_path / "plain" / "manifest.json").write_text('{"rows": 5}')
    with pytest.raises(ValueError, match=r"plain/manifest.json: not a tokensift manifest \(KeyError"):
        TokenLoader(tmp_path / "plain", 4, 1)
    shard = snapshot / "data" / "train-00001-of-00003.parquet"
    data = shard.read_bytes()
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="train-00001-of-00003.parquet: listed in .*manifest.json but missing"):
        TokenLoader(snapshot, 4, 1)
    pq.write_table(_tables()[1].slice(0, 2), shard)
    with pytest.raises(ValueError, match=r"train-00001-of-00003.parquet: 2 rows, .*manifest.json says 3"):
        TokenLoader(snapshot, 4, 1)
    shard.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(OSError, match="train-00001-of-00003.parquet: cannot read"):
        TokenLoader(snapshot, 4, 1)
    other = _tables()[1].set_column(1, "input_ids", pa.array([[7, 7, 7], [8], [9]], pa.list_(pa.int32())))
    pq.write_table(other, shard)  # same rows, other content: only the checksum or the token counts see it
    with pytest.raises(ValueError, match="train-00001-of-00003.parquet: sha256 differs"):
        TokenLoader(snapshot, 4, 1, verify=True)
    with pytest.raises(ValueError, match="train-00001-of-00003.parquet: row group 0 holds 5 tokens, the manifest says 29"):
        _collect(TokenLoader(snapshot, 4, 1, shuffle=False, lanes=1))


def test_bad_rows_name_file_row_and_column(tmp_path):
    path = tmp_path / "data" / "train-00000-of-00001.parquet"

    def write(table):
        path.unlink(missing_ok=True)
        write_snapshot(tmp_path, [table])

    ids = pa.array([[1, 2, 3], [4, 5]], pa.list_(pa.int32()))
    write(pa.table({"input_ids": ids, "token_weights": pa.array([[0, 1, 1], [0, 1, 1]], pa.list_(pa.float32()))}))
    with pytest.raises(ValueError, match=r"train-00000-of-00001.parquet: row 1 has 2 'input_ids' but 'token_weights' of length 3"):
        _collect(TokenLoader(tmp_path, 2, 1, shuffle=False))
    write(pa.table({"input_ids": ids, "loss_mask": pa.array([[0, 1, 1], [0]], pa.list_(pa.int8()))}))
    with pytest.raises(ValueError, match=r"row 1 has 2 'input_ids' but 'loss_mask' of length 1"):
        _collect(TokenLoader(tmp_path, 2, 1, shuffle=False))
    write(pa.table({"input_ids": ids, "loss_mask": pa.array([[0, 1, 1], [2, 1]], pa.list_(pa.int8()))}))
    with pytest.raises(ValueError, match=r"row 1 has a 'loss_mask' value other than 0 or 1"):
        _collect(TokenLoader(tmp_path, 2, 1, shuffle=False))
    write(pa.table({"text": ["a"]}))
    with pytest.raises(ValueError, match="no 'input_ids' column"):
        TokenLoader(tmp_path, 2, 1)
    with pytest.raises(ValueError, match="rank must be in"):
        TokenLoader(tmp_path, 2, 1, rank=2, world_size=2)
