"""Preference-pair batches for token-level DPO (``tokensift.trainers.dpo``), from a snapshot.

A pair is one snapshot row (the tokenize stage with ``rejected_column``; the ``critical`` stage with
``pairs: true``): ``input_ids`` (prompt + chosen response), ``rejected_input_ids`` (prompt + rejected
response), ``loss_mask``/``rejected_loss_mask`` (1 on response tokens; absent: ``prompt_length`` decides,
absent too: every token but the first) and ``rejected_token_weights`` (the critical weights ``1 - s_t``
aligned with ``rejected_input_ids``: index i weighs the prediction of token i; absent: 1).

Each side is truncated to ``seq_len + 1`` tokens and right-padded, one pair per row (pairs are not
packed). Batch tensors, all ``[B, seq_len]`` and aligned with the labels (``labels[t] = ids[t + 1]``):
``chosen_input_ids``, ``chosen_labels``, ``chosen_mask`` (bool: label t is a response token),
``rejected_input_ids``, ``rejected_labels``, ``rejected_mask``, ``rejected_weights``.

Order and sharding follow ``TokenLoader``: pairs are shuffled per epoch (seeded); global batch k is pairs
``[k*B*W, (k+1)*B*W)`` of the stream, rank r taking ``r + W*j`` of them; ``state_dict()`` counts the pairs
the job consumed and resumes at the next batch. The shards are those ``manifest.json`` lists (on any
filesystem, like the token loader's), with the manifest's row counts; the pairs are held in memory
(preference sets are small).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch

from tokensift.pipeline import fs
from tokensift.pipeline.schema import INPUT_IDS, PROMPT_LENGTH, TOKEN_WEIGHTS
from tokensift.pipeline.shards import MANIFEST
from tokensift.pipeline.tokenize import LOSS_MASK, REJECTED

SIDES = ("chosen", "rejected")


def _column(table: pa.Table, side: str, name: str) -> str:
    return (REJECTED if side == "rejected" else "") + name


def _side(table: pa.Table, where: str, side: str) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Token ids, response masks and weights of one side of every pair (row order)."""
    ids_col = _column(table, side, INPUT_IDS)
    if ids_col not in table.column_names:
        raise ValueError(f"{where}: no '{ids_col}' column: token-level DPO needs preference pairs "
                         f"(the tokenize stage with rejected_column)")
    ids = table.column(ids_col).to_pylist()
    masks = table.column(_column(table, side, LOSS_MASK)).to_pylist() if _column(table, side, LOSS_MASK) in table.column_names else None
    plens = table.column(PROMPT_LENGTH).to_pylist() if PROMPT_LENGTH in table.column_names else None
    wcol = _column(table, side, TOKEN_WEIGHTS) if side == "rejected" else None
    weights = table.column(wcol).to_pylist() if wcol and wcol in table.column_names else None
    out_ids, out_mask, out_w = [], [], []
    for r, seq in enumerate(ids):
        if seq is None or len(seq) < 2:
            raise ValueError(f"{where}: row {r}: '{ids_col}' needs at least 2 tokens")
        n = len(seq)
        if masks is not None:
            m = np.asarray(masks[r], np.int8)
        else:
            m = np.ones(n, np.int8)
            m[: max(int(plens[r]) if plens is not None else 0, 1)] = 0
        w = np.asarray(weights[r], np.float32) if weights is not None else np.ones(n, np.float32)
        for name, arr in (("loss_mask", m), ("token_weights", w)):
            if len(arr) != n:
                raise ValueError(f"{where}: row {r}: {side} '{name}' has {len(arr)} entries for {n} tokens")
        out_ids.append(np.asarray(seq, np.int64))
        out_mask.append(m)
        out_w.append(w)
    return out_ids, out_mask, out_w


def _pad(seqs: list[np.ndarray], width: int, dtype) -> np.ndarray:
    out = np.zeros((len(seqs), width), dtype=dtype)
    for r, s in enumerate(seqs):
        s = s[:width]
        out[r, : len(s)] = s
    return out


class PairLoader:
    """Batches of preference pairs from a snapshot's shards (see the module docstring).

    Args:
        snapshot_dir: the snapshot (local path or URI).
        seq_len: label positions per side (each side keeps its first ``seq_len + 1`` tokens).
        batch_size: pairs per batch on this rank.
        rank, world_size: data-parallel rank and size.
        seed: shuffling seed.
        shuffle: shuffle the pairs every epoch.
        storage: storage options for URIs.
    """

    def __init__(self, snapshot_dir: str, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, storage=None):
        manifest = fs.join(str(snapshot_dir), MANIFEST)
        if not fs.is_file(manifest, storage):
            raise FileNotFoundError(f"{snapshot_dir}: not a tokensift snapshot (no {MANIFEST})")
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.sides = {side: ([], [], []) for side in SIDES}
        for shard in fs.read_json(manifest, storage)["shards"]:
            f = fs.join(str(snapshot_dir), shard["file"])
            table = fs.read_table(f, storage=storage)
            if table.num_rows != shard["rows"]:
                raise ValueError(f"{f}: {table.num_rows} rows, {manifest} says {shard['rows']}")
            for side in SIDES:
                for acc, part in zip(self.sides[side], _side(table, str(f), side), strict=True):
                    acc.extend(part)
        self.n_pairs = len(self.sides["chosen"][0])
        if self.n_pairs < batch_size * world_size:
            raise ValueError(f"{snapshot_dir}: {self.n_pairs} pairs, fewer than one global batch "
                             f"({batch_size} x {world_size} ranks)")
        self._batches = 0
        self._epoch_order: tuple[int, np.ndarray | None] = (-1, None)

    def state_dict(self) -> dict:
        return {"pairs": self._batches * self.batch_size * self.world_size, "seed": self.seed,
                "n_pairs": self.n_pairs, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "n_pairs", "seq_len"):
            if state.get(key) != self.state_dict()[key]:
                raise ValueError(f"pair loader state does not match: {key} was {state.get(key)}, now {self.state_dict()[key]}")
        per_batch = self.batch_size * self.world_size
        if state["pairs"] % per_batch:
            raise ValueError(f"pair loader state is at pair {state['pairs']}, not a multiple of the global batch {per_batch}")
        self._batches = state["pairs"] // per_batch

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n_pairs) if self.shuffle else None
            self._epoch_order = (epoch, np.arange(self.n_pairs) if order is None else order)
        return self._epoch_order[1]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        B, W = self.batch_size, self.world_size
        while True:
            first = (self._batches * B * W) + self.rank
            picks = [first + W * j for j in range(B)]
            rows = [int(self._order(g // self.n_pairs)[g % self.n_pairs]) for g in picks]
            self._batches += 1
            yield self.batch(rows)

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """The padded tensors of pairs ``rows``."""
        out = {}
        width = self.seq_len + 1
        for side in SIDES:
            ids, masks, weights = (self.sides[side][i] for i in range(3))
            tok = _pad([ids[r] for r in rows], width, np.int64)
            mask = _pad([masks[r] for r in rows], width, np.int8)
            w = _pad([weights[r] for r in rows], width, np.float32)
            out[f"{side}_input_ids"] = torch.from_numpy(tok[:, :-1].copy())
            out[f"{side}_labels"] = torch.from_numpy(tok[:, 1:].copy())
            out[f"{side}_mask"] = torch.from_numpy(mask[:, 1:] > 0)
            if side == "rejected":
                out["rejected_weights"] = torch.from_numpy(w[:, 1:].copy())
        return out
