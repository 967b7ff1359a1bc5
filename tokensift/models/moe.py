"""Mixture-of-experts routing and load balancing: top-k with capacity, micro- vs global-batch LBL, aux-free bias.

The load-balancing loss (Switch Transformer; Qiu et al., "Demons in the Detail", arXiv 2501.11873)::

    LBL = N_E * sum_i f_i * p_i

``f_i`` is the share of the token->expert assignments that went to expert ``i`` (counts / (tokens * top_k),
so ``sum_i f_i = 1``) and ``p_i`` the mean router probability of expert ``i`` over the tokens. A perfectly
balanced router gives 1.0 whatever ``top_k`` is (the DeepSpeed / Megatron scale; HF's Mixtral loss is ``k``
times larger). ``f`` is a count, so it carries no gradient; the loss trains the router through ``p``.

- **micro** (Megatron / DeepSpeed default): ``f`` and ``p`` from the tokens of one micro-batch. With few
  sequences per micro-batch this is nearly a per-sequence constraint that pushes even single-domain
  sequences to use every expert.
- **global** (Qiu et al., used in Qwen3-MoE): ``f`` from the counts of every micro-batch of the optimizer
  step so far, summed over data-parallel ranks (``dist.all_reduce`` on detached counts), reset at the
  optimizer-step boundary; ``p`` stays local and differentiable. Micro-batch m of a step uses the counts of
  micro-batches 1..m (Megatron's ``global_aux_loss`` running sum). Not safe with activation checkpointing:
  recomputing a forward would count its tokens twice.
- **aux_free** (DeepSeek-V3; Wang et al., arXiv 2408.15664): no loss. A per-expert bias ``b`` is added to the
  router probabilities for top-k *selection only* (gates use the unbiased probabilities) and updated after
  each optimizer step from the global-batch load: ``b_i <- b_i + gamma * sign(mean(load) - load_i)``.

Router probabilities and indices are taken before capacity dropping (Megatron-LM issue #1513).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

BALANCE_MODES = ("micro", "global", "aux_free")


def expert_counts(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert (int64, length ``num_experts``) for ``expert_index`` of shape tokens x top_k."""
    return torch.bincount(expert_index.reshape(-1), minlength=num_experts)


def balance_loss(router_probs: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """``N_E * sum_i f_i * p_i`` with ``p_i`` the mean of ``router_probs`` (tokens x experts) and ``f`` given."""
    num_experts = router_probs.shape[-1]
    return num_experts * torch.sum(fraction.to(router_probs.dtype) * router_probs.mean(dim=0))


def load_balancing_loss(router_probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Micro-batch load-balancing loss ``N_E * sum_i f_i p_i`` over the tokens given.

    Args:
        router_probs: tokens x experts softmax probabilities (before capacity dropping).
        expert_index: tokens x top_k selected experts (before capacity dropping).
        num_experts: N_E.

    Returns:
        A scalar tensor; 1.0 for a uniform router whose assignments are perfectly balanced.
    """
    if router_probs.dim() != 2 or router_probs.shape[1] != num_experts:
        raise ValueError(f"router_probs must be tokens x {num_experts}, got {tuple(router_probs.shape)}")
    if expert_index.dim() != 2 or expert_index.shape[0] != router_probs.shape[0]:
        raise ValueError(
            f"expert_index must be tokens x top_k with {router_probs.shape[0]} tokens, got {tuple(expert_index.shape)}"
        )
    counts = expert_counts(expert_index, num_experts).to(router_probs.dtype)
    return balance_loss(router_probs, counts / counts.sum())


def route_top_k(router_probs: torch.Tensor, top_k: int, bias: torch.Tensor | None = None):
    """Top-k experts per token. Returns ``(gates, expert_index)``, both tokens x top_k.

    Args:
        router_probs: tokens x experts softmax probabilities.
        top_k: experts per token.
        bias: per-expert selection bias (aux-loss-free balancing); it changes which experts are chosen but not
            the gate values, which stay the unbiased probabilities.
    """
    scores = router_probs if bias is None else router_probs + bias.to(router_probs.dtype)
    expert_index = scores.topk(top_k, dim=-1).indices
    return router_probs.gather(-1, expert_index), expert_index


def combine_weights(gates: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Weights of the kept assignments (tokens x top_k): for top_k > 1 the kept gates are renormalised to
    sum to 1 (DeepSpeed top-2 / top-k gating); top-1 keeps the raw probability (Switch), so the router
    still gets a gradient from the language-model loss."""
    gates = gates * keep
    if gates.shape[-1] > 1:
        gates = gates / gates.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(gates.dtype).eps)
    return gates


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None) -> int | None:
    """Slots per expert: ``ceil(capacity_factor * tokens * top_k / N_E)``; ``None`` means no dropping."""
    if capacity_factor is None or capacity_factor <= 0:
        return None
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_mask(expert_index: torch.Tensor, num_experts: int, capacity: int | None) -> torch.Tensor:
    """Which assignments (tokens x top_k, bool) fit in their expert's ``capacity`` slots.

    Slots are filled first choices first, then second choices, ..., each in token order (GShard / DeepSpeed
    priority). Dropped assignments contribute nothing; the token still flows on the residual stream.
    """
    if capacity is None:
        return torch.ones_like(expert_index, dtype=torch.bool)
    choice_major = expert_index.t().reshape(-1)  # all first choices, then all second choices, ...
    onehot = F.one_hot(choice_major, num_experts)
    position = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # slot taken in the chosen expert
    return (position < capacity).reshape(expert_index.shape[1], -1).t()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over the default process group when torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class ExpertLoad(nn.Module):
    """Per-layer expert load over the current global batch, and the aux-loss-free selection bias.

    ``counts`` (int64, not checkpointed) holds the assignments of every micro-batch since
    :meth:`reset`; with ``sync=True`` each micro-batch's counts are all-reduced before being added, so they
    cover every data-parallel rank. ``expert_bias`` is a checkpointed buffer, never touched by the optimizer.
    """

    def __init__(self, num_experts: int):
        super().__init__()
        self.register_buffer("counts", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.synced = True

    def reset(self) -> None:
        """Start a new global batch (call before its first micro-batch)."""
        self.counts.zero_()
        self.synced = True

    @torch.no_grad()
    def add(self, counts: torch.Tensor, sync: bool) -> None:
        """Add one micro-batch's counts, all-reduced over data-parallel ranks first when ``sync``."""
        counts = counts.detach().clone()
        if sync:
            all_reduce_sum(counts)
        else:
            self.synced = False
        self.counts += counts

    def fraction(self) -> torch.Tensor:
        """``f_i``: share of the counted assignments per expert (uniform before anything is counted)."""
        total = self.counts.sum()
        if total == 0:
            return torch.full_like(self.counts, 1.0 / self.counts.numel(), dtype=torch.float32)
        return self.counts.float() / total

    @torch.no_grad()
    def sync(self) -> None:
        """All-reduce counts that were gathered locally, so they describe the whole global batch."""
        if not self.synced:
            all_reduce_sum(self.counts)
            self.synced = True

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """Aux-loss-free step: ``b_i += rate * sign(mean(load) - load_i)`` from the global-batch load."""
        self.sync()
        load = self.counts.float()
        self.expert_bias += rate * torch.sign(load.mean() - load).to(self.expert_bias.dtype)
