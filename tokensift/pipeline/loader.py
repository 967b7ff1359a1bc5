"""Packed, weighted token batches for training: a torch ``IterableDataset`` over a snapshot or a live stream.

The documents of an epoch are put in a seeded order (shards shuffled, then rows within each shard) and
their ``input_ids`` are concatenated into one token stream; epochs follow each other in the same stream.
Sequence ``g`` of the stream is ``inputs = stream[g*L : g*L+L]``, ``labels = stream[g*L+1 : g*L+L+1]``,
so every token is an input exactly once and a label exactly once. ``loss_weights[t]`` is the weight of
label ``t``: the document's ``token_weights`` value for that token (index ``i`` of a document weighs the
prediction of token ``i`` from its prefix), 1 where the column is absent, and 0 on the first token of
every document when ``mask_doc_boundary`` (it would be predicted from the previous document).

Sharding: rank ``r`` of ``W`` takes the sequences ``g = r + W*n`` (``n = 0, 1, ...``) and groups them in
batches of ``B``; so global batch ``k`` (batch ``k`` of every rank) is exactly sequences
``[k*B*W, (k+1)*B*W)`` of the stream: no overlap, no gap. DataLoader workers of one rank take that rank's
batches round-robin (worker ``w`` of ``N`` makes batches ``k = w, w+N, ...``), which is the order a
``DataLoader`` returns them in, so the stream a rank sees does not depend on the number of workers. A batch
is only produced when the whole global batch exists, so every rank stops after the same number of steps.
Every rank and worker reads every shard (one at a time, in stream order) and keeps its own sequences;
shard token counts are read once up front, so resuming skips earlier shards without reading them.

Resume: ``state_dict()`` records how many sequences the whole job consumed; ``load_state_dict()`` makes
the next batch the one that would have followed, even with another world size whose global batch divides
that count.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tokensift.pipeline.schema import INPUT_IDS, TOKEN_WEIGHTS


@dataclass
class _Chunk:
    """Consecutive documents of the stream, flattened: ``tokens[i]`` sits at stream position ``start + i``."""

    start: int
    tokens: np.ndarray
    weights: np.ndarray


def flatten_documents(
    table: pa.Table, where: str, order: np.ndarray | None, mask_doc_boundary: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the documents of ``table`` (rows in ``order``) into token and label-weight arrays.

    Args:
        table: rows with ``input_ids`` (list<int>) and optionally ``token_weights`` (list<float>, same lengths).
        where: file or table name used in error messages.
        order: row permutation to apply first (``None``: keep the order).
        mask_doc_boundary: weight 0 on the first token of every document.
    """
    if INPUT_IDS not in table.column_names:
        raise ValueError(f"{where}: no '{INPUT_IDS}' column (columns: {', '.join(table.column_names)})")
    if order is not None:
        table = table.take(pa.array(order))
    ids = table.column(INPUT_IDS).combine_chunks()
    if ids.null_count:
        row = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{where}: row {_source_row(row, order)} has a null '{INPUT_IDS}'")
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
    tokens = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    if TOKEN_WEIGHTS in table.column_names:
        col = table.column(TOKEN_WEIGHTS).combine_chunks()
        wlen = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False) | (wlen != lengths))
        if bad.size:
            row = int(bad[0])
            raise ValueError(
                f"{where}: row {_source_row(row, order)} has {int(lengths[row])} '{INPUT_IDS}' but "
                f"'{TOKEN_WEIGHTS}' of length {wlen[row] if col[row].is_valid else 'null'}"
            )
        weights = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    else:
        weights = np.ones(len(tokens), dtype=np.float32)
    if mask_doc_boundary and len(lengths):
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        weights[starts[lengths > 0]] = 0.0
    return tokens, weights


def _source_row(row: int, order: np.ndarray | None) -> int:
    return int(order[row]) if order is not None else row


def _permutation(n: int, seed: int, *keys: int) -> np.ndarray:
    return np.random.default_rng([seed, *keys]).permutation(n)


class _SnapshotSource:
    """The shards ``<dir>/data/*.parquet``; knows every shard's token count so skipping reads nothing."""

    def __init__(self, snapshot_dir: str | Path, seed: int, shuffle: bool, mask_doc_boundary: bool, epochs):
        data = Path(snapshot_dir) / "data"
        self.files = sorted(data.glob("*.parquet"))
        if not self.files:
            raise FileNotFoundError(f"no parquet shards in {data}")
        self.seed, self.shuffle, self.mask, self.epochs = seed, shuffle, mask_doc_boundary, epochs
        self.rows, self.file_tokens = [], []
        for f in self.files:
            schema = pq.read_schema(f)
            if INPUT_IDS not in schema.names:
                raise ValueError(f"{f}: no '{INPUT_IDS}' column (columns: {', '.join(schema.names)})")
            ids = pq.read_table(f, columns=[INPUT_IDS]).column(INPUT_IDS)
            self.rows.append(len(ids))
            self.file_tokens.append(int(pc.sum(pc.list_value_length(ids)).as_py() or 0))
        self.tokens_per_epoch = sum(self.file_tokens)
        if self.tokens_per_epoch < 2:
            raise ValueError(f"{data}: the snapshot holds {self.tokens_per_epoch} tokens; at least 2 are needed")

    def chunks(self, position: int) -> Iterator[_Chunk]:
        """Shards in stream order from the one holding ``position`` on; earlier ones are not read."""
        epoch = position // self.tokens_per_epoch
        while self.epochs is None or epoch < self.epochs:
            order = _permutation(len(self.files), self.seed, epoch) if self.shuffle else range(len(self.files))
            start = epoch * self.tokens_per_epoch
            for i in order:
                end = start + self.file_tokens[i]
                if end > position:
                    yield _Chunk(start, *self._read(i, epoch))
                start = end
            epoch += 1

    def _read(self, i: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        f = self.files[i]
        columns = [c for c in (INPUT_IDS, TOKEN_WEIGHTS) if c in pq.read_schema(f).names]
        rows = _permutation(self.rows[i], self.seed, epoch, i) if self.shuffle else None
        return flatten_documents(pq.read_table(f, columns=columns), str(f), rows, self.mask)


class _StreamSource:
    """Tables from an iterable (or a zero-argument callable returning one); replayed to resume."""

    def __init__(self, tables, seed: int, shuffle: bool, mask_doc_boundary: bool, epochs):
        self.tables, self.seed, self.shuffle, self.mask = tables, seed, shuffle, mask_doc_boundary
        self.epochs = 1 if epochs is None else epochs
        self.tokens_per_epoch = None

    def chunks(self, position: int) -> Iterator[_Chunk]:
        start = 0
        for epoch in range(self.epochs):
            tables = self.tables() if callable(self.tables) else self.tables
            for i, table in enumerate(tables):
                rows = _permutation(table.num_rows, self.seed, epoch, i) if self.shuffle else None
                tokens, weights = flatten_documents(table, f"stream table {i}", rows, self.mask)
                if start + len(tokens) > position:
                    yield _Chunk(start, tokens, weights)
                start += len(tokens)


class TokenLoader(IterableDataset):
    """Fixed-length packed batches ``{input_ids, labels, loss_weights}`` (each ``[batch_size, seq_len]``).

    Iterating it is the drop-in for a training loop (``for batch in TokenLoader(dir, 1024, 8): ...``);
    iterating again continues where the last loop stopped. ``labels`` are already shifted (``labels[t]``
    is the token after ``input_ids[t]``), so the loss is ``weighted_loss(token_cross_entropy(logits,
    labels), loss_weights)`` from ``tokensift.trainers.losses``.

    Args:
        snapshot_dir: a snapshot (reads ``<dir>/data/*.parquet``: ``input_ids``, optional ``token_weights``).
        seq_len: tokens per sequence.
        batch_size: sequences per batch on this rank (the micro-batch).
        rank: this data-parallel rank.
        world_size: number of data-parallel ranks.
        seed: shuffling seed (document order per epoch).
        epochs: passes over the data; ``None`` repeats forever (snapshots) or once (streams).
        shuffle: shuffle shard order and rows within shards every epoch.
        mask_doc_boundary: weight 0 for the first token of each document (predicted across a boundary).
        num_workers: DataLoader worker processes that read and pack (0: in this process).
        pin_memory: pin batches (for GPU training).
    """

    def __init__(
        self,
        snapshot_dir: str | Path | None,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        *,
        epochs: int | None = None,
        shuffle: bool = True,
        mask_doc_boundary: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        _source=None,
    ):
        super().__init__()
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {epochs}")
        self.seq_len, self.batch_size, self.rank, self.world_size, self.seed = (
            seq_len, batch_size, rank, world_size, seed)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.source = _source or _SnapshotSource(snapshot_dir, seed, shuffle, mask_doc_boundary, epochs)
        self._batches = 0  # batches this rank has handed out

    @classmethod
    def from_stream(
        cls, tables: Iterable[pa.Table] | Callable[[], Iterable[pa.Table]], seq_len: int, batch_size: int,
        rank: int = 0, world_size: int = 1, seed: int = 0, *, epochs: int | None = None, shuffle: bool = True,
        mask_doc_boundary: bool = True, num_workers: int = 0, pin_memory: bool = False,
    ) -> TokenLoader:
        """A loader over live ``pa.Table`` batches (e.g. a pipeline's in-memory output).

        ``tables`` must give the same tables in the same order each time it is iterated (a list, or a
        callable such as ``lambda: ds.iter_batches(batch_format="pyarrow")``): every rank reads the whole
        stream and keeps its own sequences, and resuming replays it up to the saved position. Rows are
        shuffled within each table when ``shuffle``.
        """
        source = _StreamSource(tables, seed, shuffle, mask_doc_boundary, epochs)
        return cls(None, seq_len, batch_size, rank, world_size, seed, num_workers=num_workers,
                   pin_memory=pin_memory, _source=source)

    @property
    def global_batch_tokens(self) -> int:
        """Label positions per global batch (all ranks)."""
        return self.batch_size * self.world_size * self.seq_len

    def state_dict(self) -> dict:
        """Where the job is: sequences consumed by all ranks, plus what must match on resume."""
        return {
            "sequences": self._batches * self.batch_size * self.world_size,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "tokens_per_epoch": self.source.tokens_per_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at the batch after the saved position (the same stream, any world size dividing it)."""
        for key in ("seq_len", "seed", "tokens_per_epoch"):
            if state.get(key) != self.state_dict()[key]:
                raise ValueError(
                    f"loader state does not match this loader: {key} was {state.get(key)}, "
                    f"now {self.state_dict()[key]}")
        per_batch = self.batch_size * self.world_size
        if state["sequences"] % per_batch:
            raise ValueError(
                f"loader state is at sequence {state['sequences']}, not a multiple of the global batch "
                f"({self.batch_size} x {self.world_size} ranks = {per_batch} sequences)")
        self._batches = state["sequences"] // per_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        if info is not None:  # inside a DataLoader worker: this worker's share of the rank's batches
            yield from self._batches_from(self._batches + info.id, info.num_workers)
            return
        if self.num_workers > 0:
            batches = DataLoader(self, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)
        else:
            batches = self._batches_from(self._batches, 1)
        for batch in batches:
            self._batches += 1
            yield batch

    def _batches_from(self, first: int, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches ``first, first+step, ...`` while their global batch exists."""
        B, W, L = self.batch_size, self.world_size, self.seq_len
        k = first
        buffer = _Window(self.source.chunks((self.rank + W * k * B) * L))
        while True:
            starts = [(self.rank + W * (k * B + j)) * L for j in range(B)]
            if not buffer.extend_to((k + 1) * B * W * L + 1):  # the global batch is incomplete
                return
            buffer.drop_before(starts[0])
            tokens = np.stack([buffer.tokens(s, s + L + 1) for s in starts])
            weights = np.stack([buffer.weights(s + 1, s + L + 1) for s in starts])
            yield {
                "input_ids": torch.from_numpy(tokens[:, :-1].copy()),
                "labels": torch.from_numpy(tokens[:, 1:].copy()),
                "loss_weights": torch.from_numpy(weights),
            }
            k += step


class _Window:
    """A sliding window over the stream, fed by chunks, holding only what is still needed."""

    def __init__(self, chunks: Iterator[_Chunk]):
        self.chunks, self.parts = chunks, []

    @property
    def end(self) -> int:
        return self.parts[-1].start + len(self.parts[-1].tokens) if self.parts else 0

    def extend_to(self, position: int) -> bool:
        """Read chunks until the window reaches ``position``; False when the stream ends first."""
        while self.end < position:
            chunk = next(self.chunks, None)
            if chunk is None:
                return False
            if len(chunk.tokens):
                self.parts.append(chunk)
        return True

    def drop_before(self, position: int) -> None:
        while self.parts and self.parts[0].start + len(self.parts[0].tokens) <= position:
            self.parts.pop(0)

    def tokens(self, a: int, b: int) -> np.ndarray:
        return self._slice(a, b, "tokens")

    def weights(self, a: int, b: int) -> np.ndarray:
        return self._slice(a, b, "weights")

    def _slice(self, a: int, b: int, field: str) -> np.ndarray:
        starts = [p.start for p in self.parts]
        i = bisect.bisect_right(starts, a) - 1
        out = []
        while a < b:
            part = self.parts[i]
            arr = getattr(part, field)
            take = arr[a - part.start : min(b, part.start + len(arr)) - part.start]
            out.append(take)
            a += len(take)
            i += 1
        return np.concatenate(out) if len(out) > 1 else out[0]
