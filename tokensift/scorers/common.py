"""Helpers shared by the token scorers: model params, padded forwards, aligned losses, Arrow I/O.

Alignment (DESIGN.md, research note §1): a per-token array of a sequence of L tokens has L entries; entry ``i``
refers to the prediction of token ``i`` from its prefix, entry 0 is a dummy 0. With ``prompt_length`` p the
scored (response) positions are ``i >= max(p, 1)``; pretraining text (p = 0) scores every token but the first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from tokensift.models.causal_lm import SMOLLM2, load_causal_lm
from tokensift.pipeline import schema


@dataclass
class LMParams:
    """Args:
    model: local model directory (or hub name when a network exists), or ``smollm2`` for the shipped asset.
    gguf_file: a GGUF file inside ``model`` (dequantized once and cached).
    dtype: ``float32`` (fastest on CPU) or ``bfloat16``.
    device: ``cpu``, ``cuda``, ``cuda:1``...
    batch_size: sequences per forward pass.
    max_length: longest sequence scored; longer ones are truncated (their tail gets weight 0).
    """

    model: str = SMOLLM2
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 8
    max_length: int = 1024


def load_lm(p: LMParams, model: str | None = None, gguf_file: str | None = None):
    """``(model, tokenizer)`` for ``model`` (default ``p.model``) with ``p``'s dtype and device."""
    gguf = gguf_file if model else p.gguf_file
    return load_causal_lm(model or p.model, gguf_file=gguf, dtype=p.dtype, device=p.device)


def read_sequences(batch: pa.Table, stage: str, column: str = schema.INPUT_IDS) -> tuple[list[np.ndarray], np.ndarray]:
    """``column`` (token ids) rows and ``prompt_length`` (zeros when the column is absent) of a batch."""
    if column not in batch.column_names:
        raise ValueError(f"{stage}: batch has no column {column!r}; run the tokenize stage first")
    seqs = [np.asarray(r, dtype=np.int64) for r in batch.column(column).to_pylist()]
    if schema.PROMPT_LENGTH in batch.column_names:
        plens = batch.column(schema.PROMPT_LENGTH).to_numpy(zero_copy_only=False)
        if np.isnan(plens.astype(np.float64)).any():
            row = int(np.flatnonzero(np.isnan(plens.astype(np.float64)))[0])
            raise ValueError(f"{stage}: row {row}: column {schema.PROMPT_LENGTH!r} is null")
        plens = plens.astype(np.int64)
    else:
        plens = np.zeros(len(seqs), dtype=np.int64)
    return seqs, plens


def with_token_weights(batch: pa.Table, weights: list[np.ndarray], name: str = schema.TOKEN_WEIGHTS) -> pa.Table:
    """The batch with ``name`` (default ``token_weights``; list<float32>) set (replaced if present)."""
    col = schema.ragged_column([np.asarray(w, np.float32) for w in weights], schema.TOKEN_WEIGHTS_TYPE)
    if name in batch.column_names:
        return batch.set_column(batch.column_names.index(name), name, col)
    return batch.append_column(name, col)


def pad(sequences: list[np.ndarray], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad with 0: ``(ids [B,T] long, attention_mask [B,T] long)``."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for r, s in enumerate(sequences):
        ids[r, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids.to(device), mask.to(device)


def scored_mask(lengths: torch.Tensor, prompt_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] bool: positions ``max(p, 1) <= i < length`` (response tokens, or all but the first)."""
    pos = torch.arange(width, device=lengths.device)[None, :]
    start = prompt_lengths.clamp(min=1)[:, None]
    return (pos >= start) & (pos < lengths[:, None])


def aligned_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B,T] fp32 CE with ``loss[:, i] = -log p(ids[:, i] | ids[:, :i])`` and ``loss[:, 0] = 0``."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    return F.pad(nll, (1, 0))


def shift_right(values: torch.Tensor) -> torch.Tensor:
    """Per-position values of the predicting row ``i-1`` moved to index ``i`` (index 0 gets 0): [B,T,...]."""
    out = torch.zeros_like(values)
    out[:, 1:] = values[:, :-1]
    return out


def chunks(n: int, size: int):
    """Index ranges ``[start, stop)`` of ``n`` items in chunks of ``size``."""
    for start in range(0, n, size):
        yield start, min(n, start + size)
