"""Forwards of a frozen model (ssToken's history model, cDPO's reference) on the loader's packed batches.

The batch contract (``tokensift.pipeline.loader.TokenLoader``): ``input_ids`` [B, L] with optional
``position_ids`` (position of input token t in its document) and ``document_ids`` (its document's index in
the row; attention only within a document, causal). The built-in GPT takes both in its forward; an HF causal
LM gets ``position_ids`` and a 4-D additive mask that is causal and block-diagonal over documents.
"""

from __future__ import annotations

import torch


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, L, L] bool: query ``i`` may attend key ``j`` (``j <= i`` and the same document)."""
    L = document_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=document_ids.device).tril()
    return causal & (document_ids[:, :, None] == document_ids[:, None, :])


def is_builtin_gpt(model) -> bool:
    from tokensift.models.gpt import GPT

    return isinstance(model, GPT)


def packed_forward(model: torch.nn.Module, batch: dict, **kwargs):
    """``model``'s output on ``batch`` with documents kept apart (raw output: a tensor, tuple or HF output)."""
    ids = batch["input_ids"]
    extra = {k: batch[k] for k in ("position_ids", "document_ids") if k in batch}
    if is_builtin_gpt(model):
        return model(ids, **extra, **kwargs)
    if "document_ids" in extra:
        dtype = next(model.parameters()).dtype
        allowed = document_mask(extra.pop("document_ids"))[:, None]
        kwargs["attention_mask"] = torch.zeros(allowed.shape, dtype=dtype, device=ids.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return model(input_ids=ids, **extra, **kwargs)


def packed_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """[B, L, V] logits of ``model`` on ``batch`` (see :func:`packed_forward`)."""
    out = packed_forward(model, batch)
    if isinstance(out, tuple):
        out = out[0]
    return out if isinstance(out, torch.Tensor) else out.logits
