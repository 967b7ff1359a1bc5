"""Where the loader's token stream comes from: a snapshot's row groups on any filesystem, or a live stream.

A source gives ``chunks(position)``: the :class:`~tokensift.pipeline.packing.Chunk` s of the stream in
order, from the one holding stream position ``position`` on. An epoch is every document once; epochs
follow each other in the stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tokensift.pipeline import fs
from tokensift.pipeline.packing import LOSS_MASK, Chunk, flatten_documents
from tokensift.pipeline.publish import MANIFEST
from tokensift.pipeline.schema import INPUT_IDS, TOKEN_WEIGHTS
from tokensift.pipeline.snapshot import sha256

COLUMNS = (INPUT_IDS, TOKEN_WEIGHTS, LOSS_MASK)


def permutation(n: int, seed: int, *keys: int) -> np.ndarray:
    """A seeded permutation of ``range(n)``, the same for the same ``(seed, *keys)`` in every process."""
    return np.random.default_rng([seed, *keys]).permutation(n)


@contextlib.contextmanager
def reading(path: str):
    """Re-raise a read error of ``path`` (I/O, not Parquet, truncated) with the path in front."""
    try:
        yield
    except (OSError, pa.ArrowException) as e:
        raise OSError(f"{path}: cannot read: {e}") from e


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group of a shard: ``shard`` indexes the manifest's files, ``index`` the file's groups."""

    shard: int
    index: int
    first_row: int
    rows: int
    tokens: int


class SnapshotSource:
    """The row groups of the shards listed in ``<snapshot>/manifest.json``, and only those.

    Every listed shard must be present with the manifest's row count (``verify``: and its sha256). An
    epoch takes the row groups of all shards in a seeded order (file order without ``shuffle``) and the
    rows of each group in a seeded order. Token counts per row group come from the manifest's
    ``row_groups`` (``[{"rows", "tokens"}]`` per shard) when it has them; otherwise the ``input_ids``
    column is read once here. After that, a chunk is read only when the stream reaches it.

    Args:
        snapshot: local path or URI (``s3://``, ``gs://``, ``hdfs://``) of the snapshot.
        seed: shuffling seed.
        shuffle: shuffle row groups and their rows every epoch.
        mask_doc_boundary: weight 0 on the first token of every document.
        epochs: passes over the data; ``None`` repeats forever.
        verify: check each shard's sha256 against the manifest (reads every byte once).
        storage: storage options for :func:`tokensift.pipeline.fs.resolve`.
    """

    seekable = True

    def __init__(self, snapshot, seed: int, shuffle: bool, mask_doc_boundary: bool, epochs: int | None,
                 verify: bool = False, storage=None):
        self.uri, self.storage = str(snapshot), storage
        self.seed, self.shuffle, self.mask, self.epochs = seed, shuffle, mask_doc_boundary, epochs
        manifest_path = fs.join(self.uri, MANIFEST)
        if not fs.is_file(manifest_path, storage):
            raise FileNotFoundError(f"{self.uri}: not a tokensift snapshot (no {MANIFEST})")
        with reading(manifest_path):
            try:
                shards = fs.read_json(manifest_path, storage)["shards"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{manifest_path}: not a tokensift manifest ({type(e).__name__}: {e})") from e
        self.fs = fs.resolve(self.uri, storage)[0]
        self.files = [fs.join(self.uri, s["file"]) for s in shards]
        with ThreadPoolExecutor(min(16, max(1, len(shards)))) as pool:  # footers: one round trip each
            found = list(pool.map(lambda a: self._inspect(*a, manifest_path, verify), enumerate(shards)))
        self.metadata = [meta for meta, _, _ in found]
        self.columns = [columns for _, columns, _ in found]
        self.groups = []
        for i, (meta, _, tokens) in enumerate(found):
            first = 0
            for j, n_tokens in enumerate(tokens):
                rows = meta.row_group(j).num_rows
                self.groups.append(RowGroup(i, j, first, rows, int(n_tokens)))
                first += rows
        self.tokens_per_epoch = sum(g.tokens for g in self.groups)
        if self.tokens_per_epoch < 2:
            raise ValueError(f"{self.uri}: the snapshot holds {self.tokens_per_epoch} tokens; at least 2 are needed")
        self.total_tokens = None if epochs is None else epochs * self.tokens_per_epoch
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _inspect(self, i: int, shard: dict, manifest_path: str, verify: bool) -> tuple[pq.FileMetaData, list, list]:
        """Check shard ``i`` against its manifest entry; ``(footer, columns to read, tokens per row group)``."""
        path = self.files[i]
        inner = fs.resolve(path, self.storage)[1]
        if self.fs.get_file_info(inner).type != pafs.FileType.File:
            raise FileNotFoundError(f"{path}: listed in {manifest_path} but missing")
        with reading(path), self.fs.open_input_file(inner) as handle:
            meta = pq.ParquetFile(handle).metadata
            digest = sha256(path, self.storage) if verify else None
        if meta.num_rows != shard["rows"]:
            raise ValueError(f"{path}: {meta.num_rows} rows, {manifest_path} says {shard['rows']}")
        if digest is not None and digest != shard["sha256"]:
            raise ValueError(f"{path}: sha256 differs from {manifest_path}")
        names = meta.schema.to_arrow_schema().names
        if INPUT_IDS not in names:
            raise ValueError(f"{path}: no '{INPUT_IDS}' column (columns: {', '.join(names)})")
        rows = [meta.row_group(j).num_rows for j in range(meta.num_row_groups)]
        listed = shard.get("row_groups")
        if listed is not None and [g["rows"] for g in listed] != rows:
            raise ValueError(f"{path}: row groups of {rows} rows, {manifest_path} lists {[g['rows'] for g in listed]}")
        tokens = [g["tokens"] for g in listed] if listed is not None else self._count_tokens(i, meta, inner)
        return meta, [c for c in COLUMNS if c in names], tokens

    def _count_tokens(self, i: int, meta: pq.FileMetaData, inner: str) -> list[int]:
        with reading(self.files[i]), self.fs.open_input_file(inner) as handle:
            f = pq.ParquetFile(handle, metadata=meta)
            ids = [f.read_row_group(j, columns=[INPUT_IDS]).column(INPUT_IDS) for j in range(meta.num_row_groups)]
        return [int(pc.sum(pc.list_value_length(c)).as_py() or 0) for c in ids]

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Row-group order of ``epoch`` and the stream offset (within the epoch) where each one ends."""
        if epoch not in self._orders:
            n = len(self.groups)
            order = permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)
            self._orders = {epoch: (order, np.cumsum([self.groups[g].tokens for g in order]))}
        return self._orders[epoch]

    def chunks(self, position: int) -> Iterator[Chunk]:
        """Row groups in stream order from the one holding ``position`` on; earlier ones are not read."""
        epoch = position // self.tokens_per_epoch
        while self.epochs is None or epoch < self.epochs:
            order, ends = self._order(epoch)
            base = epoch * self.tokens_per_epoch
            for i in range(int(np.searchsorted(ends, max(position - base, 0), side="right")), len(order)):
                if self.groups[order[i]].tokens:
                    yield self._read(int(order[i]), epoch, base + int(ends[i]) - self.groups[order[i]].tokens)
            epoch += 1

    def _read(self, gi: int, epoch: int, start: int) -> Chunk:
        g = self.groups[gi]
        path = self.files[g.shard]
        with reading(path), self.fs.open_input_file(fs.resolve(path, self.storage)[1]) as handle:
            f = pq.ParquetFile(handle, metadata=self.metadata[g.shard])
            table = f.read_row_group(g.index, columns=self.columns[g.shard])
        rows = permutation(g.rows, self.seed, epoch, gi) if self.shuffle else None
        chunk = flatten_documents(table, path, rows, self.mask, first_row=g.first_row, start=start)
        if len(chunk.tokens) != g.tokens:
            raise ValueError(f"{path}: row group {g.index} holds {len(chunk.tokens)} tokens, the manifest says {g.tokens}")
        return chunk


class StreamSource:
    """Tables from an iterable (or a zero-argument callable returning one); replayed to resume."""

    seekable = False
    total_tokens = None
    tokens_per_epoch = None

    def __init__(self, tables, seed: int, shuffle: bool, mask_doc_boundary: bool, epochs: int | None):
        self.tables, self.seed, self.shuffle, self.mask = tables, seed, shuffle, mask_doc_boundary
        self.epochs = 1 if epochs is None else epochs

    def chunks(self, position: int) -> Iterator[Chunk]:
        start = 0
        for epoch in range(self.epochs):
            tables = self.tables() if callable(self.tables) else self.tables
            for i, table in enumerate(tables):
                rows = permutation(table.num_rows, self.seed, epoch, i) if self.shuffle else None
                chunk = flatten_documents(table, f"stream table {i}", rows, self.mask, start=start)
                if chunk.end > position:
                    yield chunk
                start = chunk.end
