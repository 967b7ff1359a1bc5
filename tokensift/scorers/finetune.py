"""A brief completion-only fine-tune of an HF causal LM and its tuning sets: the tuned copies of SHAD
(shuffle-tuned) and of cDPO's contrastive estimation (positive / negative models) are made with it."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tokensift.pipeline import schema, sources
from tokensift.scorers import common


def read_tune_rows(paths: list[str], prompt_column: str, response_columns: list[str], stage: str) -> pa.Table:
    """The ``prompt_column`` and ``response_columns`` of every row of ``paths`` (Parquet, JSONL) where all are set."""
    tables = []
    for shard in sources.expand(list(paths)):
        t = sources.read(shard, prompt_column, schema.ID)
        t = t.rename_columns([prompt_column if c == schema.TEXT else c for c in t.column_names])
        missing = [c for c in response_columns if c not in t.column_names]
        if missing:
            raise ValueError(f"{stage}: {shard.path} has no column {missing[0]!r}")
        ok = pc.is_valid(t.column(prompt_column))
        for c in response_columns:
            ok = pc.and_(ok, pc.is_valid(t.column(c)))
        tables.append(t.filter(ok).select([prompt_column, *response_columns]))
    return pa.concat_tables(tables)


def tokenized_pairs(
    rows: pa.Table, tokenizer: str, prompt_column: str, response_column: str, max_length: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Token ids of prompt + response (the tokenize stage with ``tokenizer``) and the prompt lengths."""
    from tokensift.pipeline.tokenize import Tokenize, TokenizeParams

    tok = Tokenize(TokenizeParams(tokenizer=tokenizer, text_column=prompt_column, prompt_column=prompt_column,
                                  response_column=response_column, max_length=max_length))
    out = tok(rows.select([prompt_column, response_column]))
    seqs = [np.asarray(r, np.int64) for r in out.column(schema.INPUT_IDS).to_pylist()]
    return seqs, out.column(schema.PROMPT_LENGTH).to_numpy().astype(np.int64)


def finetune_lm(
    model,
    sequences: list[np.ndarray],
    prompt_lengths: np.ndarray,
    steps: int,
    lr: float,
    batch_size: int = 4,
    last_layers: int | None = None,
    seed: int = 0,
) -> list[float]:
    """Briefly fine-tune ``model`` in place on the response tokens of ``sequences`` (completion-only SFT).

    Args:
        model: an HF causal LM (its decoder layers at ``model.model.layers``).
        sequences, prompt_lengths: token ids and prompt lengths; the loss covers tokens ``i >= max(p, 1)``.
        steps: optimizer steps (AdamW, weight decay 0), each on ``batch_size`` sequences drawn with ``seed``.
        last_layers: train only the last N decoder layers and the final norm (``None``: every parameter).

    Returns the training loss of every step. The model is left in eval mode.
    """
    device = next(model.parameters()).device
    params = list(model.parameters())
    if last_layers is not None:
        for q in params:
            q.requires_grad_(False)
        inner = model.get_decoder()
        trainable = [inner.layers[-last_layers:], inner.norm]
        params = [q for m in trainable for q in m.parameters()]
        for q in params:
            q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            extra = list(range(len(sequences)))
            rng.shuffle(extra)
            order += extra
        idx, order = order[:batch_size], order[batch_size:]
        ids, mask = common.pad([sequences[i] for i in idx], device)
        lengths = mask.sum(1)
        keep = common.scored_mask(lengths, torch.as_tensor(prompt_lengths[idx], device=device), ids.shape[1])
        loss = common.aligned_losses(model(input_ids=ids, attention_mask=mask).logits, ids)[keep].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    for q in model.parameters():
        q.requires_grad_(True)
    return losses
