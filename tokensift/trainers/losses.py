"""Token-weighted language-modelling losses and their normalisation.

With per-token cross-entropy ``ce_t`` and weight ``w_t`` (``loss_weights`` from the loader, possibly changed
by an online token scorer; a mask is ``w`` in {0, 1}):

- ``weights`` (default): ``L = sum_t w_t ce_t / sum_t w_t`` over the micro-batch; the paper mode of Rho-1,
  ssToken and ESLM ("mean over the selected tokens").
- ``tokens``: ``L = sum_t w_t ce_t / N`` with ``N`` the micro-batch's label positions (a token-mean).
- ``global``: every kept token of the optimizer step weighs the same, whatever micro-batch or rank it is
  in: ``L_m = sum_{t in m} w_t ce_t * (G * D) / sum_{all m', ranks} w``. DeepSpeed's ``backward`` divides
  by the ``G`` accumulation steps and data-parallel training averages over the ``D`` ranks, so the
  gradient applied is exactly ``grad(sum_all w ce) / sum_all w`` (research note §1.5; the bug fixed in
  prime-rl #1957 and verl #3994). The denominator is all-reduced over the data-parallel group.

:func:`kept_head_loss` is the weighted loss with an LM-head backward that touches only the weighted rows, for
a scorer (ESLM, ssToken) that drops tokens after seeing the full logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

NORMALIZATIONS = ("weights", "tokens", "global")


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Unreduced cross-entropy in fp32: ``ce[..., t] = -log softmax(logits[..., t, :])[labels[..., t]]``.

    Args:
        logits: ``[..., V]`` scores aligned with ``labels`` (the loader's labels are already shifted).
        labels: ``[...]`` target ids.
    """
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="none")
    return flat.reshape(labels.shape)


def weighted_loss(
    token_loss: torch.Tensor, weights: torch.Tensor, normalize: str = "weights",
    denominator: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """``sum(w * ce) / denominator`` for one micro-batch.

    Args:
        token_loss: per-token losses (any shape).
        weights: same shape; detached inside (scores are never differentiated).
        normalize: ``weights`` (divide by ``sum(w)``), ``tokens`` (by ``token_loss.numel()``) or
            ``global`` (by ``denominator``, from :func:`global_denominator`).
        denominator: required for ``global``.

    A micro-batch whose weights are all zero gives a zero loss that still backpropagates (zero gradients),
    so every rank runs the same collective operations.
    """
    weights = weights.detach().to(token_loss.dtype)
    return (token_loss * weights).sum() / normalizer(weights, normalize, denominator)


def normalizer(
    weights: torch.Tensor, normalize: str = "weights", denominator: torch.Tensor | float | None = None
) -> torch.Tensor | float:
    """The divisor of :func:`weighted_loss`: ``sum(w)`` (clamped away from 0), ``w.numel()`` or ``denominator``."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    if normalize == "weights":
        return weights.detach().sum().clamp_min(torch.finfo(torch.float32).tiny)
    if normalize == "tokens":
        return max(weights.numel(), 1)
    if denominator is None:
        raise ValueError("normalize='global' needs the denominator from global_denominator()")
    return denominator


def global_denominator(weight_sums: list[torch.Tensor] | torch.Tensor, grad_accum: int) -> torch.Tensor:
    """``sum_all w / (G * D)``: the per-micro-batch denominator of the ``global`` normalisation.

    Args:
        weight_sums: this rank's weight sum of each micro-batch of the optimizer step (or their total).
        grad_accum: ``G``, micro-batches per optimizer step.

    Sums over the data-parallel ranks with ``all_reduce`` when ``torch.distributed`` is initialised
    (``D`` = its world size; 1 otherwise). Clamped away from 0 for steps where nothing is kept.
    """
    local = torch.stack(list(weight_sums)).sum() if isinstance(weight_sums, list) else weight_sums.sum()
    local = local.detach().double()
    world = 1
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
    return (local / (grad_accum * world)).float().clamp_min(torch.finfo(torch.float32).tiny)


class _KeptHeadCE(torch.autograd.Function):
    """Weighted CE of kept rows from precomputed logits; backward only through the kept rows of the head."""

    @staticmethod
    def forward(ctx, h, weight, bias, logits, labels, w):
        logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        ce = -logp.gather(1, labels[:, None]).squeeze(1)
        scale = (w / w.sum()).to(logp.dtype)
        ctx.save_for_backward(h, weight, logp, labels, scale)
        ctx.has_bias = bias is not None
        return (scale * ce).sum()

    @staticmethod
    def backward(ctx, grad):
        h, weight, logp, labels, scale = ctx.saved_tensors
        d = logp.exp()
        d[torch.arange(len(labels)), labels] -= 1.0
        d = (d * (scale * grad)[:, None]).to(h.dtype)
        dh = d @ weight
        dw = d.t() @ h
        db = d.sum(0) if ctx.has_bias else None
        return dh, dw.to(weight.dtype), db, None, None, None


def kept_head_loss(
    hidden: torch.Tensor, head: torch.nn.Linear, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``sum_t w_t CE(head(h_t), y_t) / sum_t w_t`` over tokens with ``w_t > 0``; the head's backward sees only them.

    Args:
        hidden: final hidden states [B,T,C] (with grad), the input of ``head``.
        head: the LM head (``nn.Linear``, weight [V,C], tied or not).
        logits: ``head(hidden)`` computed without grad for scoring [B,T,V]; reused, not recomputed.
        labels: targets [B,T]; weights: [B,T] (the scorer's output: 0 = not kept).

    The gradient equals that of the dense weighted CE, but the backward matmuls cost ``4*C*V`` FLOPs per
    kept token instead of per token (see :func:`head_flops`).
    """
    keep = weights > 0
    if not bool(keep.any()):
        return hidden.sum() * 0.0
    return _KeptHeadCE.apply(
        hidden[keep], head.weight, head.bias, logits.detach()[keep], labels[keep], weights[keep]
    )


def head_flops(n_tokens: int, n_kept: int, d_model: int, vocab: int) -> dict[str, float]:
    """LM-head FLOPs of one step: dense CE vs :func:`kept_head_loss` (forward 2CV/token, backward 4CV/token)."""
    fwd = 2.0 * d_model * vocab
    dense = 3.0 * fwd * n_tokens
    ours = fwd * n_tokens + 2.0 * fwd * n_kept
    return {"dense": dense, "kept": ours, "saved": dense - ours}
