"""One micro-batch: forward, online token weights, weighted loss.

For the built-in GPT the LM head's backward runs only on the rows that carry weight: the model returns
its final hidden states; without a scorer the head runs on the weighted rows only; with a scorer, full
logits are computed without gradient for it and the loss reuses them through
``tokensift.trainers.losses.kept_head_loss``, so tokens a scorer drops (ESLM, ssToken masks) cost no
LM-head backward. Any other model (an HF causal LM) computes full logits with gradient.

Packed batches keep their documents apart: the forward gets the batch's ``position_ids`` and
``document_ids`` (the GPT takes them; an HF causal LM gets ``position_ids`` and a 4-D block-diagonal causal
``attention_mask``; see :mod:`tokensift.models.packing`), so a packed row trains exactly as its documents
would one by one.
"""

from __future__ import annotations

import torch
from torch import nn

from tokensift.models.gpt import GPT
from tokensift.models.packing import packed_forward, packed_logits
from tokensift.trainers.losses import kept_head_loss, normalizer, token_cross_entropy, weighted_loss


def forward_logits(engine: nn.Module, module: nn.Module, batch: dict) -> torch.Tensor:
    """``[B, T, V]`` logits of a (packed) batch; ``engine`` wraps ``module`` (or is it)."""
    return packed_logits(engine, batch, module)


@torch.no_grad()
def scored_weights(engine: nn.Module, module: nn.Module, batch: dict, scorer) -> torch.Tensor:
    """The scorer's weights for ``batch`` from a forward without gradient (used to pre-count kept tokens)."""
    logits = forward_logits(engine, module, batch)
    token_loss = token_cross_entropy(logits, batch["labels"])
    return scorer(token_loss, logits, batch["loss_weights"], batch, module).detach()


def micro_batch_loss(
    engine: nn.Module, module: nn.Module, batch: dict, scorer=None, normalize: str = "weights",
    denominator: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, token_loss, weights)`` of one micro-batch; ``loss`` is what ``engine.backward`` takes.

    Args:
        engine: the DeepSpeed engine (or the plain model) called for the forward.
        module: the underlying ``nn.Module`` (``engine.module``), passed to the scorer.
        batch: ``input_ids``, ``labels``, ``loss_weights`` (``[B, T]``; packed: ``position_ids``,
            ``document_ids``) on the model's device. When
            ``loss_weights`` already holds a scorer's output (see :func:`scored_weights`), pass no scorer.
        scorer: an online token scorer ``scorer(token_loss, logits, weights, batch, model) -> weights``.
        normalize: see ``tokensift.trainers.losses.weighted_loss``.
        denominator: for ``normalize="global"``.
    """
    labels, weights = batch["labels"], batch["loss_weights"]
    if not isinstance(module, GPT):
        logits = forward_logits(engine, module, batch)
        token_loss = token_cross_entropy(logits, labels)
        if scorer is not None:
            weights = scorer(token_loss.detach(), logits.detach(), weights, batch, module).detach()
        return weighted_loss(token_loss, weights, normalize, denominator), token_loss.detach(), weights
    hidden = packed_forward(engine, batch, module, return_hidden=True)
    if scorer is None:  # only the weighted rows go through the head, forward and backward
        kept = weights != 0
        if bool(kept.all()):
            token_loss = token_cross_entropy(module.lm_head(hidden), labels)
        else:
            kept_loss = token_cross_entropy(module.lm_head(hidden[kept]), labels[kept])
            token_loss = kept_loss.new_zeros(labels.shape).masked_scatter(kept, kept_loss)
        return weighted_loss(token_loss, weights, normalize, denominator), token_loss.detach(), weights
    with torch.no_grad():  # full logits for the scorer; the loss reuses them (ESLM's kept-row head backward)
        logits = module.lm_head(hidden.detach())
        token_loss = token_cross_entropy(logits, labels)
    weights = scorer(token_loss, logits, weights, batch, module).detach()
    scale = weights.sum() / normalizer(weights, normalize, denominator)  # kept_head_loss divides by sum(w)
    loss = kept_head_loss(hidden, module.lm_head, logits, labels, weights) * scale
    return loss, token_loss, weights
