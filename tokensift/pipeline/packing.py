"""Document-aware packing: documents flattened into a token stream, and packed rows cut from it.

A :class:`Chunk` is consecutive documents of the stream (one Parquet row group, or one table of a live
stream) flattened to per-token arrays. :func:`pack_rows` cuts rows of ``L + 1`` stream tokens into the
batch the loader yields: ``input_ids``, ``labels`` (shifted), ``loss_weights`` and ``loss_mask`` of each
label, and per input token ``position_ids`` (position inside its document, counted from the row start for
a document continued from the previous row) and ``document_ids`` (its document's index within the row).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tokensift.pipeline.schema import INPUT_IDS, LOSS_MASK, TOKEN_WEIGHTS

FIELDS = ("tokens", "weights", "mask", "starts")


@dataclass
class Chunk:
    """Consecutive documents of the stream: element ``i`` of each array is stream position ``start + i``.

    Args:
        start: stream position of the first token.
        tokens: token ids (int32).
        weights: weight of each token as a label (``token_weights``; 0 on document starts when masked).
        mask: 1 where the token is a response token (``loss_mask``; all 1 without the column).
        starts: True where a document begins.
    """

    start: int
    tokens: np.ndarray
    weights: np.ndarray
    mask: np.ndarray
    starts: np.ndarray

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


def flatten_documents(
    table: pa.Table, where: str, order: np.ndarray | None, mask_doc_boundary: bool, first_row: int = 0,
    start: int = 0,
) -> Chunk:
    """Concatenate the documents of ``table`` (rows in ``order``) into one :class:`Chunk`.

    Args:
        table: rows with ``input_ids`` (list<int>) and optionally ``token_weights`` (list<float>) and
            ``loss_mask`` (list<int>, 0 or 1), both as long as ``input_ids``.
        where: file or table name used in error messages.
        order: row permutation to apply first (``None``: keep the order).
        mask_doc_boundary: weight 0 on the first token of every document.
        first_row: row number of the table's first row in its file (for error messages).
        start: stream position of the chunk.
    """
    if INPUT_IDS not in table.column_names:
        raise ValueError(f"{where}: no '{INPUT_IDS}' column (columns: {', '.join(table.column_names)})")
    if order is not None:
        table = table.take(pa.array(order))

    def row_of(i: int) -> int:
        return first_row + (int(order[i]) if order is not None else i)

    ids = table.column(INPUT_IDS).combine_chunks()
    if ids.null_count:
        row = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{where}: row {row_of(row)} has a null '{INPUT_IDS}'")
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
    tokens = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    weights = _aligned(table, TOKEN_WEIGHTS, lengths, where, row_of, np.float32)
    mask = _aligned(table, LOSS_MASK, lengths, where, row_of, np.int8)
    if mask is not None and ((mask != 0) & (mask != 1)).any():
        row = int(np.searchsorted(np.cumsum(lengths), np.flatnonzero((mask != 0) & (mask != 1))[0], side="right"))
        raise ValueError(f"{where}: row {row_of(row)} has a '{LOSS_MASK}' value other than 0 or 1")
    weights = np.ones(len(tokens), np.float32) if weights is None else weights
    mask = np.ones(len(tokens), np.int8) if mask is None else mask
    starts = np.zeros(len(tokens), bool)
    starts[(np.cumsum(lengths) - lengths)[lengths > 0]] = True
    if mask_doc_boundary:
        weights[starts] = 0.0
    return Chunk(start, tokens, weights, mask, starts)


def _aligned(table: pa.Table, column: str, lengths: np.ndarray, where: str, row_of, dtype) -> np.ndarray | None:
    """The per-token values of list column ``column`` (``None`` when absent), checked against ``lengths``."""
    if column not in table.column_names:
        return None
    col = table.column(column).combine_chunks()
    clen = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False) | (clen != lengths))
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"{where}: row {row_of(row)} has {int(lengths[row])} '{INPUT_IDS}' but '{column}' of length "
            f"{clen[row] if col[row].is_valid else 'null'}"
        )
    return col.flatten().to_numpy(zero_copy_only=False).astype(dtype)


class Window:
    """Stream positions ``[a, b)`` read through chunks, holding only the chunks still needed.

    Reads must move forward. A seekable source (a snapshot) starts over at the chunk holding ``a`` when
    ``a`` lies past what is held, so nothing in between is read; a live stream is read through.
    """

    def __init__(self, source):
        self.source, self.parts, self.chunks = source, [], None

    @property
    def end(self) -> int:
        return self.parts[-1].end if self.parts else 0

    def reaches(self, position: int) -> bool:
        """Read chunks until ``position`` is held; False when the stream ends first."""
        if self.chunks is None:
            self.chunks = self.source.chunks(0)
        while self.end < position:
            chunk = next(self.chunks, None)
            if chunk is None:
                return False
            if len(chunk.tokens):
                self.parts.append(chunk)
        return True

    def take(self, a: int, b: int) -> dict[str, np.ndarray] | None:
        """The ``FIELDS`` arrays of stream positions ``[a, b)``; ``None`` when the stream ends first."""
        if self.chunks is None or (self.source.seekable and a >= self.end):
            self.parts, self.chunks = [], self.source.chunks(a)
        while self.parts and self.parts[0].end <= a:
            self.parts.pop(0)
        if not self.reaches(b):
            return None
        i = bisect.bisect_right([p.start for p in self.parts], a) - 1
        pieces = []
        while a < b:
            part = self.parts[i]
            pieces.append((part, a - part.start, min(b, part.end) - part.start))
            a, i = part.start + pieces[-1][2], i + 1
        return {f: np.concatenate([getattr(p, f)[lo:hi] for p, lo, hi in pieces]) for f in FIELDS}


def pack_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """The batch of ``L + 1``-token stream slices ``rows`` (from :meth:`Window.take`), each ``[B, L]``."""
    tokens = np.stack([r["tokens"] for r in rows]).astype(np.int64)
    starts = np.stack([r["starts"][:-1] for r in rows])
    starts[:, 0] = True  # a row begins a document for attention: what came before is not in its context
    index = np.arange(starts.shape[1])
    position = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return {
        "input_ids": torch.from_numpy(tokens[:, :-1].copy()),
        "labels": torch.from_numpy(tokens[:, 1:].copy()),
        "loss_weights": torch.from_numpy(np.stack([r["weights"][1:] for r in rows])),
        "loss_mask": torch.from_numpy(np.stack([r["mask"][1:] for r in rows])),
        "position_ids": torch.from_numpy(position),
        "document_ids": torch.from_numpy(np.cumsum(starts, axis=1) - 1),
    }

