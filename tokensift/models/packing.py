"""Packed rows with their documents kept apart, for the built-in GPT and HF causal LMs.

A packed batch (``tokensift.pipeline.loader.TokenLoader``) carries, beside ``input_ids`` ``[B, L]``,
``position_ids`` (position of input token ``t`` in its document) and ``document_ids`` (its document's index
in the row). Query ``i`` may attend key ``j`` when ``j <= i`` and both are in the same document: the
block-diagonal causal mask, with which the loss of a packed row equals the losses of its documents run one
by one. The built-in GPT takes both ids in its forward; an HF causal LM gets ``position_ids`` and the mask
as a 4-D additive ``attention_mask`` (``0`` where allowed, the dtype's minimum elsewhere), which HF models
use as given. Flash-attention kernels take no such mask: for an HF model loaded with
``attn_implementation="flash_attention_*"`` the rows are flattened into one and HF's packed-sequence path
(documents found where ``position_ids`` restart, varlen kernels) keeps them apart, as with
``DataCollatorWithFlattening``.
"""

from __future__ import annotations

import torch
from torch import nn


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L, L]`` bool: query ``i`` may attend key ``j`` (``j <= i`` and the same document).

    Args:
        document_ids: ``[B, L]`` document index of each token in its row.
    """
    L = document_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=document_ids.device).tril()
    return causal & (document_ids[:, :, None] == document_ids[:, None, :])


def additive_mask(document_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, L, L]`` additive mask of :func:`document_mask` (0 where allowed, ``finfo(dtype).min`` elsewhere)."""
    allowed = document_mask(document_ids)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=document_ids.device).masked_fill(~allowed, torch.finfo(dtype).min)


def packed_forward(model: nn.Module, batch: dict, module: nn.Module | None = None, **kwargs):
    """``model``'s raw output on ``batch`` with documents kept apart (a tensor, a tuple or an HF output).

    Args:
        model: what to call (the model, or a wrapper such as a DeepSpeed engine).
        batch: ``input_ids`` and, when packed, ``position_ids`` and ``document_ids``.
        module: the ``nn.Module`` under ``model`` when ``model`` is a wrapper.
        kwargs: passed on (``return_hidden`` for the GPT, ``output_attentions`` for both).
    """
    from tokensift.models.gpt import GPT

    ids = batch["input_ids"]
    extra = {k: batch[k] for k in ("position_ids", "document_ids") if batch.get(k) is not None}
    if isinstance(module if module is not None else model, GPT):
        return model(ids, **extra, **kwargs)
    if "document_ids" in extra:
        net = module if module is not None else model
        if "flash" in str(getattr(getattr(net, "config", None), "_attn_implementation", "")):
            return flattened_forward(model, ids, extra["position_ids"], **kwargs)
        kwargs["attention_mask"] = additive_mask(extra.pop("document_ids"), next(net.parameters()).dtype)
    return model(input_ids=ids, **extra, **kwargs)


def flattened_forward(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, **kwargs):
    """An HF causal LM's output on ``[B, L]`` packed rows run as one ``[1, B*L]`` row without a mask.

    HF finds the documents where ``position_ids`` restart (every row starts at 0, so rows stay apart too);
    ``logits`` come back as ``[B, L, V]``. The path for attention kernels that take no mask.
    """
    B, L = input_ids.shape
    out = model(input_ids=input_ids.reshape(1, B * L), position_ids=position_ids.reshape(1, B * L),
                use_cache=False, **kwargs)
    out.logits = out.logits.reshape(B, L, -1)
    return out


def packed_logits(model: nn.Module, batch: dict, module: nn.Module | None = None) -> torch.Tensor:
    """``[B, L, V]`` logits of ``model`` on ``batch`` (see :func:`packed_forward`)."""
    out = packed_forward(model, batch, module)
    return out if isinstance(out, torch.Tensor) else out.logits
