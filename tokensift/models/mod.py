"""Mixture-of-Depths routing (Raposo et al., arXiv 2404.02258): top-k tokens per sequence go through a block.

Per routed block a linear router gives each token a scalar ``r_i = w^T x_i``. The ``k = C * S`` tokens of
each sequence with the largest ``r`` (C = capacity, 12.5 % in the paper's best setting, on every other
block) are gathered in their original order into a compact sequence ``X~``, go through the block
(attention + MLP, causal among themselves), and are updated as::

    x_i <- x_i + r_i * f(X~)_i      (routed tokens; f is the block without its residual)
    x_i <- x_i                      (all other tokens)

Multiplying by ``r_i`` puts the router on the gradient path. Top-k over the sequence is not causal (it
looks at future tokens), so sampling needs a causal decision per token; the paper gives two:

- ``bce``: an auxiliary binary cross-entropy on the router logits with target "was in the top-k"; at
  sampling time a token is routed when ``sigmoid(r_i) > 0.5``. It shares the router, so it touches the LM.
- ``predictor``: a small MLP reading the block input under a stop-gradient, trained with the same BCE; it
  leaves the language-model objective unchanged. A token is routed when its predicted logit is > 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROUTER_AUX = ("predictor", "bce")


def mod_capacity(seq_len: int, capacity: float) -> int:
    """Tokens routed per sequence: ``max(1, floor(capacity * seq_len))``."""
    return max(1, int(capacity * seq_len))


def top_k_positions(router_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (batch x k, ascending, so causal order is kept) of the k largest router logits per row."""
    return router_logits.topk(k, dim=-1).indices.sort(dim=-1).values


def positions_mask(positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Boolean batch x seq_len mask with ``True`` at ``positions`` (batch x k)."""
    mask = torch.zeros(positions.shape[0], seq_len, dtype=torch.bool, device=positions.device)
    return mask.scatter_(1, positions, True)


def routed_attention_mask(routed: torch.Tensor) -> torch.Tensor:
    """Attention mask (batch x 1 x T x T, True = attend) for causal routing on the full sequence.

    Query ``t`` attends to earlier routed keys only, which is what a KV cache holding just the processed
    tokens gives at sampling time. Each query also sees itself so unrouted rows stay finite (their output is
    discarded).
    """
    seq_len = routed.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=routed.device).tril()
    own = torch.eye(seq_len, dtype=torch.bool, device=routed.device)
    return (causal & routed[:, None, :] | own)[:, None]


def routing_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of routing ``logits`` against top-k membership ``targets`` (bool)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


class RoutePredictor(nn.Module):
    """Causal top-k membership predictor: ``Linear(C, C/4) -> GELU -> Linear(C/4, 1)`` on ``stopgrad(x)``."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.hidden = max(1, n_embd // 4)
        self.net = nn.Sequential(nn.Linear(n_embd, self.hidden), nn.GELU(), nn.Linear(self.hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.detach()).squeeze(-1)

    def flops_per_token(self) -> int:
        """Forward multiply-add FLOPs (2 per MAC) per token."""
        return 2 * (self.net[0].in_features * self.hidden + self.hidden)


def routing_agreement(causal: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """How well causal routing decisions match training top-k: accuracy, recall and precision of routed."""
    hit = (causal & targets).sum().item()
    return {
        "agreement": (causal == targets).float().mean().item(),
        "recall": hit / max(1, targets.sum().item()),
        "precision": hit / max(1, causal.sum().item()),
    }
