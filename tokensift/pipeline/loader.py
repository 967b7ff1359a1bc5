"""Packed, weighted token batches for training: a torch ``IterableDataset`` over a snapshot or a live stream.

**The stream.** An epoch puts the documents in a seeded order (a snapshot's Parquet row groups shuffled
across all shards, then the rows within each group) and concatenates their ``input_ids``; epochs follow
each other in one token stream. Sequence ``g`` is ``inputs = stream[g*L : g*L+L]``, ``labels =
stream[g*L+1 : g*L+L+1]``, so every token is an input exactly once and a label exactly once.
``loss_weights[t]`` is the weight of label ``t``: the document's ``token_weights`` value for that token, 1
where the column is absent, and 0 on the first token of every document when ``mask_doc_boundary``;
``loss_mask[t]`` is the document's ``loss_mask`` value for label ``t`` (1 on response tokens, all 1 without
the column). Documents are packed but kept apart: ``position_ids`` restart at 0 at every document start (and
at the row start) and ``document_ids`` number the documents of a row, so a model that honours them (the
built-in GPT, and HF models through ``tokensift.models.packing``) never attends across a boundary.

**The order (lanes).** Sequences are handed out in windows of ``lanes * rounds`` consecutive sequences,
``rounds`` = an epoch's sequences // ``lanes`` (a window is about an epoch; a live stream, whose length is
unknown, has one round per window, i.e. stream order). Lane ``c`` of window ``w`` is its ``rounds``
consecutive sequences from ``c * rounds``, and position ``p = w * lanes * rounds + n * lanes + c`` of the
training order is sequence ``n`` of that lane. Global batch ``k`` is positions ``[k*B*W, (k+1)*B*W)``; rank
``r`` takes the ``B`` positions from ``k*B*W + r*B``. The order is a permutation of the stream's sequences:
no overlap, no gap (only the last window's remainder of fewer than ``lanes`` sequences and a final
incomplete global batch are not used). With ``lanes = B*W*N`` (the default; ``N`` DataLoader workers, at
least 1) each worker of each rank always reads the same ``B`` lanes, each a contiguous stretch of the
stream: it reads only the row groups that hold its sequences, plus at most the group straddling each end
of each lane (a rank reads ``1/W`` of the data, plus at most ``2 * lanes / W`` row groups per epoch: within
1.25x of its share when an epoch has at least ``8 * lanes`` row groups). Any ``B``, ``W``, ``N`` give the
same batches for the same ``lanes``; reading is this tight when ``B*W*N`` divides ``lanes``.

DataLoader workers of one rank take that rank's batches round-robin (worker ``w`` of ``N`` makes batches
``k = w, w+N, ...``), the order in which a ``DataLoader`` returns them. A batch is only produced when its
whole global batch exists, so every rank stops after the same number of steps.

**Snapshots.** The loader reads ``<snapshot>/manifest.json`` (local path or ``s3://``, ``gs://``,
``hdfs://`` URI) and trusts only the shards it lists: each must be present with the manifest's row count
(``verify=True``: and its sha256), and every read error names the file. A directory without a manifest is
not a tokensift snapshot and is refused.

**Resume.** ``state_dict()`` records how many positions of the order the whole job consumed and its lanes;
``load_state_dict()`` makes the next batch the one that would have followed, with any ``B``, ``W`` and
workers whose global batch divides that count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tokensift.pipeline.loader_sources import SnapshotSource, StreamSource
from tokensift.pipeline.packing import Window, pack_rows


@dataclass(frozen=True)
class Order:
    """Training order: position ``p`` -> stream sequence, by lanes (see the module docstring).

    Args:
        lanes: sequences per round.
        rounds: consecutive sequences per lane in a window.
        sequences: sequences in the whole stream (``None``: unbounded, or unknown for a live stream).
    """

    lanes: int
    rounds: int
    sequences: int | None

    @property
    def positions(self) -> int | None:
        """Positions that map to a sequence (all full windows, then whole rounds of the last one)."""
        if self.sequences is None:
            return None
        full, rest = divmod(self.sequences, self.lanes * self.rounds)
        return (full * self.rounds + rest // self.lanes) * self.lanes

    def sequence(self, p: int) -> tuple[int, int]:
        """``(sequence index, lane)`` of position ``p``."""
        window = self.lanes * self.rounds
        w, q = divmod(p, window)
        rounds = self.rounds
        if self.sequences is not None and (w + 1) * window > self.sequences:
            rounds = (self.sequences - w * window) // self.lanes
        n, c = divmod(q, self.lanes)
        return w * window + c * rounds + n, c


class TokenLoader(IterableDataset):
    """Fixed-length packed batches, each ``[batch_size, seq_len]``: ``input_ids``, ``labels``,
    ``loss_weights``, ``loss_mask``, ``position_ids``, ``document_ids`` (see the module docstring).

    Iterating it is the drop-in for a training loop (``for batch in TokenLoader(dir, 1024, 8): ...``);
    iterating again continues where the last loop stopped. ``labels`` are already shifted (``labels[t]``
    is the token after ``input_ids[t]``), so the loss is ``weighted_loss(token_cross_entropy(logits,
    labels), loss_weights)`` from ``tokensift.trainers.losses``.

    Args:
        snapshot_dir: a snapshot, local path or URI (reads the shards its ``manifest.json`` lists:
            ``input_ids``, optional ``token_weights`` and ``loss_mask``).
        seq_len: tokens per sequence.
        batch_size: sequences per batch on this rank (the micro-batch).
        rank: this data-parallel rank.
        world_size: number of data-parallel ranks.
        seed: shuffling seed (document order per epoch).
        epochs: passes over the data; ``None`` repeats forever (snapshots) or once (streams).
        shuffle: shuffle row groups and rows within them every epoch.
        mask_doc_boundary: weight 0 for the first token of each document (predicted across a boundary).
        num_workers: DataLoader worker processes that read and pack (0: in this process).
        pin_memory: pin batches (for GPU training).
        lanes: sequences per round of the order (default ``batch_size * world_size * max(1, num_workers)``);
            a resumed loader keeps the saved one.
        verify: check every shard's sha256 against the manifest before reading.
        storage: storage options for URIs (``tokensift.pipeline.fs.resolve``); the environment otherwise.
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
        lanes: int | None = None,
        verify: bool = False,
        storage=None,
        _source=None,
    ):
        super().__init__()
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {epochs}")
        if lanes is not None and lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        self.seq_len, self.batch_size, self.rank, self.world_size, self.seed = (
            seq_len, batch_size, rank, world_size, seed)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.lanes = lanes or batch_size * world_size * max(1, num_workers)
        self.source = _source or SnapshotSource(
            snapshot_dir, seed, shuffle, mask_doc_boundary, epochs, verify=verify, storage=storage)
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
        stream and keeps its own sequences (in stream order: one round per window), and resuming replays it
        up to the saved position. Rows are shuffled within each table when ``shuffle``.
        """
        source = StreamSource(tables, seed, shuffle, mask_doc_boundary, epochs)
        return cls(None, seq_len, batch_size, rank, world_size, seed, num_workers=num_workers,
                   pin_memory=pin_memory, _source=source)

    @property
    def global_batch_tokens(self) -> int:
        """Label positions per global batch (all ranks)."""
        return self.batch_size * self.world_size * self.seq_len

    @property
    def order(self) -> Order:
        """The training order of this loader's stream (see the module docstring)."""
        per_epoch = self.source.tokens_per_epoch
        rounds = max(1, per_epoch // self.seq_len // self.lanes) if per_epoch else 1
        total = self.source.total_tokens
        return Order(self.lanes, rounds, None if total is None else (total - 1) // self.seq_len)

    def state_dict(self) -> dict:
        """Where the job is: positions of the order consumed by all ranks, plus what must match on resume."""
        return {
            "sequences": self._batches * self.batch_size * self.world_size,
            "lanes": self.lanes,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "tokens_per_epoch": self.source.tokens_per_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at the batch after the saved position (the same order, any global batch dividing it)."""
        if "lanes" not in state:
            raise ValueError("loader state has no 'lanes': it was saved by an older tokensift, whose order "
                             "this loader cannot continue")
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
        self.lanes = state["lanes"]
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
        B, W, L, order = self.batch_size, self.world_size, self.seq_len, self.order
        heads: dict[int, Window] = {}  # one read window per lane (one in all for a live stream)
        k = first
        while order.positions is None or (k + 1) * B * W <= order.positions:
            rows = []
            for p in range(k * B * W + self.rank * B, k * B * W + (self.rank + 1) * B):
                g, lane = order.sequence(p)
                head = heads.setdefault(lane if self.source.seekable else 0, Window(self.source))
                rows.append(head.take(g * L, g * L + L + 1))
            if rows[-1] is None or not (self.source.seekable or head.reaches((k + 1) * B * W * L + 1)):
                return  # a live stream ended before this global batch
            yield pack_rows(rows)
            k += step
