"""ESLM / Ada-ESLM: risk-averse selective language modeling (Bal, Cevher, Muehlebach, arXiv 2505.19893).

Each step, every token ``x_j`` of the batch gets a risk score from the *current* model, its loss
``l(x_j) = -log P(x_j | x_<j)`` or its predictive entropy ``H(x_j) = -sum_v P(v|x_<j) log P(v|x_<j)``.
The empirical value at risk ``VaR_alpha`` is the alpha-quantile of the scores of the valid tokens; tokens
with score >= VaR_alpha (the top ``ceil((1-alpha) n)``) are kept and the loss is their mean. With the loss
score that mean is the empirical ``CVaR_alpha`` of the token losses (mean of the upper tail); alpha = 0 is
plain causal LM. Scores are stop-gradient. Selection is per micro-batch on each device (the paper does not
say per device or global; per device needs no communication). No reference code exists; alpha's default
(0.5) is ours, the paper sweeps it.

**Ada-ESLM** (the paper's adaptive alpha) is not implemented: its update rule could not be read here (no
public code; the stored copies of arXiv 2505.19893 and of its ICLR 2026 OpenReview version hold only the
abstract: "Ada-ESLM adaptively tunes the selection confidence during training"). What ``alpha_rule:
risk_share`` offers instead is **our own controller, not the paper's**: after each step, alpha moves toward
the level at which the kept tokens carry a fixed share ``q`` (``risk_share``, 0.8) of the batch's total
risk, ``alpha* = 1 - k*/n`` with ``k*`` the fewest top-scored tokens whose scores sum to ``q`` of the total,
smoothed ``alpha <- s*alpha + (1-s)*alpha*`` and clipped to ``[alpha_min, alpha_max]``. A fixed alpha keeps
the same share whether the risk is spread out (early training: alpha falls, more is kept) or concentrated in
a few hard tokens (later: alpha rises). It is scale-free (units of loss cancel) and needs no validation set.

Compute: for the built-in GPT the trainer skips the LM-head backward of unkept tokens
(``tokensift.trainers.losses.kept_head_loss``). A dense trunk still runs its full backward because kept
tokens attend to dropped ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tokensift.pipeline import schema
from tokensift.pipeline.registry import register
from tokensift.scorers import common


def select_mask(scores: torch.Tensor, alpha: float, valid: torch.Tensor | None = None) -> torch.BoolTensor:
    """Keep the tokens whose score is at or above the alpha-quantile (VaR) of the valid tokens.

    The quantile is the order statistic leaving ``k = ceil((1 - alpha) * n)`` of the ``n`` valid scores at or
    above it, so with distinct scores exactly the top ``k`` are kept (ties at the threshold are all kept).

    Args:
        scores: risk scores, any shape.
        alpha: confidence level in [0, 1); 0 keeps every valid token.
        valid: bool mask of the tokens that take part (default: all).
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"eslm: alpha must be in [0, 1), got {alpha}")
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.bool()
    n = int(valid.sum())
    if n == 0:
        return torch.zeros_like(valid)
    k = n - math.floor(alpha * n + 1e-9)
    threshold = torch.topk(scores[valid].float(), k).values[-1]
    return valid & (scores.float() >= threshold)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Predictive entropy ``-sum_v p_v log p_v`` over the last dim, in fp32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def risk_scores(kind: str, token_loss: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
    """``loss`` (the token loss itself) or ``entropy`` (of the logits) as the risk score."""
    if kind == "loss":
        return token_loss.detach().float()
    if kind == "entropy":
        if logits is None:
            raise ValueError("eslm: score 'entropy' needs the logits")
        return token_entropy(logits.detach())
    raise ValueError(f"eslm: score must be 'loss' or 'entropy', got {kind!r}")


def cvar(losses: torch.Tensor, alpha: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ESLM's loss with the loss score: mean of the losses at or above VaR_alpha (empirical CVaR_alpha)."""
    keep = select_mask(losses.detach(), alpha, valid)
    return losses[keep].mean()


def risk_share_alpha(scores: torch.Tensor, share: float) -> float:
    """``1 - k*/n``: k* = fewest top scores summing to ``share`` of the total (Ada-ESLM's target level)."""
    s = torch.sort(scores.detach().float().flatten(), descending=True).values
    total = float(s.sum())
    if s.numel() == 0 or total <= 0:
        return 0.0
    k = int(torch.searchsorted(torch.cumsum(s, 0), torch.tensor(share * total * (1 - 1e-7)))) + 1
    return 1.0 - min(k, s.numel()) / s.numel()


ALPHA_RULES = ("fixed", "risk_share")


@dataclass
class ESLMParams:
    """Args:
    score: ``loss`` or ``entropy``.
    alpha: confidence level in [0, 1): keep the top ``1 - alpha`` of the valid tokens (the start value
        under ``risk_share``).
    alpha_rule: ``fixed`` (ESLM) or ``risk_share`` (our controller of the module docstring; not Ada-ESLM).
    risk_share: ``risk_share``'s share ``q`` of the batch risk the kept tokens should carry.
    smoothing: ``risk_share``'s smoothing ``s`` of alpha between steps.
    alpha_min, alpha_max: ``risk_share``'s bounds for alpha.
    """

    score: str = field(default="loss", metadata={"choices": ("loss", "entropy")})
    alpha: float = field(default=0.5, metadata={"ge": 0.0, "lt": 1.0})
    alpha_rule: str = field(default="fixed", metadata={"choices": ALPHA_RULES})
    risk_share: float = field(default=0.8, metadata={"gt": 0.0, "le": 1.0})
    smoothing: float = field(default=0.9, metadata={"ge": 0.0, "le": 1.0})
    alpha_min: float = field(default=0.0, metadata={"ge": 0.0, "lt": 1.0})
    alpha_max: float = field(default=0.9, metadata={"ge": 0.0, "lt": 1.0})


class ESLMScorer:
    """Online ESLM: returns ``weights * keep`` (the trainer's weighted mean is then the CVaR).

    State (``state_dict``): the current alpha, which ``risk_share`` moves between steps.
    """

    Params = ESLMParams

    def __init__(self, params: ESLMParams):
        risk_scores(params.score, torch.zeros(1), torch.zeros(1, 1))  # validates ``score``
        select_mask(torch.zeros(1), params.alpha)  # validates ``alpha``
        if params.alpha_rule not in ALPHA_RULES:
            raise ValueError(f"eslm: alpha_rule must be one of {', '.join(ALPHA_RULES)}, got {params.alpha_rule!r}")
        if not 0 < params.risk_share <= 1 or not 0 <= params.alpha_min <= params.alpha_max < 1:
            raise ValueError("eslm: need 0 < risk_share <= 1 and 0 <= alpha_min <= alpha_max < 1")
        self.p = params
        self.alpha = params.alpha
        self._target: list[float] = []
        self._kept = 0
        self._valid = 0

    def __call__(self, token_loss, logits, weights, batch, model) -> torch.Tensor:
        valid = weights > 0
        scores = risk_scores(self.p.score, token_loss, logits)
        keep = select_mask(scores, self.alpha, valid)
        if self.p.alpha_rule == "risk_share":
            self._target.append(risk_share_alpha(scores[valid], self.p.risk_share))
        self._kept += int(keep.sum())
        self._valid += int(valid.sum())
        return weights * keep

    def on_step_end(self, model) -> None:
        if self.p.alpha_rule == "risk_share" and self._target:
            target = float(np.mean(self._target))
            a = self.p.smoothing * self.alpha + (1 - self.p.smoothing) * target
            self.alpha = min(max(a, self.p.alpha_min), self.p.alpha_max)
        self._target = []

    def stats(self) -> dict[str, float]:
        kept = self._kept / self._valid if self._valid else 0.0
        self._kept = self._valid = 0
        return {"eslm/alpha": self.alpha, "eslm/kept_fraction": kept}

    def state_dict(self) -> dict:
        return {"alpha": float(self.alpha)}

    def load_state_dict(self, state: dict) -> None:
        self.alpha = float(state["alpha"])


@dataclass
class ESLMStageParams(common.LMParams):
    """Args (plus the model args of ``LMParams``):
    score: ``loss`` or ``entropy`` under ``model``.
    alpha: keep the top ``1 - alpha`` of each document's scored tokens (weight 1; others 0).
    """

    score: str = field(default="loss", metadata={"choices": ("loss", "entropy")})
    alpha: float = field(default=0.5, metadata={"ge": 0.0, "lt": 1.0})


@register("eslm", kind="map", params=ESLMStageParams)
class ESLMStage:
    """Offline ESLM: a fixed model's risk scores, VaR-thresholded per document into a 0/1 ``token_weights``.

    The quantile is per document (not per Ray batch) so the weights do not depend on how rows are batched.
    Scored tokens: the response (``i >= prompt_length``) when the batch has ``prompt_length``, else all.
    """

    def __init__(self, params: ESLMStageParams):
        risk_scores(params.score, torch.zeros(1), torch.zeros(1, 1))
        select_mask(torch.zeros(1), params.alpha)
        self.p = params
        self.model, _ = common.load_lm(params)

    @classmethod
    def needs(cls, p: ESLMStageParams) -> list[str]:
        return [schema.INPUT_IDS]

    @classmethod
    def adds(cls, p: ESLMStageParams) -> list[str]:
        return [schema.TOKEN_WEIGHTS]

    @torch.no_grad()
    def __call__(self, batch):
        seqs, plens = common.read_sequences(batch, "eslm")
        out = [np.zeros(len(s), np.float32) for s in seqs]
        for lo, hi in common.chunks(len(seqs), self.p.batch_size):
            part = [s[: self.p.max_length] for s in seqs[lo:hi]]
            if max(len(s) for s in part) < 2:
                continue
            ids, mask = common.pad(part, self.p.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            loss = common.aligned_losses(logits, ids)
            scores = risk_scores(self.p.score, loss, common.shift_right(logits))
            scored = common.scored_mask(mask.sum(1), torch.as_tensor(plens[lo:hi], device=ids.device), ids.shape[1])
            for r in range(hi - lo):
                keep = select_mask(scores[r], self.p.alpha, scored[r])
                out[lo + r][: len(part[r])] = keep[: len(part[r])].cpu().numpy()
        return common.with_token_weights(batch, out)
