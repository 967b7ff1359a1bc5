"""Critical tokens / cDPO (Lin et al., "Critical Tokens Matter", arXiv 2411.19943, ICML 2025).

Contrastive estimation: a positive model and a negative model are fine-tuned from the base model on correct
and on incorrect trajectories (the release: LoRA SFT, one epoch). For every response token y_t, with
``z_pos``, ``z_neg`` the two models' logits predicting it and beta_CE = 1 (hard-coded in the release),

    s_t = softmax_v((1 + beta) * z_pos - beta * z_neg)[y_t]  =  p_pos(y_t)^(1+b) / p_neg(y_t)^b / Z

and the critical-token weight of a rejected-trajectory token is ``1 - s_t`` (high where the negative model
is much more likely than the positive one). The offline stage writes ``token_weights = 1 - s_t`` on the
response tokens (0 on the prompt and index 0).

cDPO loss, :func:`token_dpo_loss`, with per-token log-ratios ``r_t = log pi(y_t) - log pi_ref(y_t)``, the
critical weights ``w_t`` on the rejected side (chosen side unweighted, ``only_neg`` in the release) and
beta_DPO = 0.1. Both forms are implemented; ``form`` picks one:

- ``sequence`` (default, the paper's token-weighted DPO):
  ``L = -mean_b log sigma(beta * (sum_t r^w_t - sum_t w_t r^l_t))``;
- ``position`` (the official release, ``CDPOTrainer``): chosen and rejected are paired position by position,
  ``L = -mean_{b,t} log sigma(beta * (r^w_t - w_t r^l_t))`` over all B x T positions (masked positions
  contribute the constant log 2, as in the release).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tokensift.pipeline import schema
from tokensift.pipeline.registry import register
from tokensift.scorers import common


def contrastive_scores(pos_logits: torch.Tensor, neg_logits: torch.Tensor, targets: torch.Tensor, beta: float = 1.0):
    """``s_t = softmax((1+beta) z_pos - beta z_neg)[y_t]`` for logits [..., V] and targets [...]."""
    z = (1 + beta) * pos_logits.float() - beta * neg_logits.float()
    return F.softmax(z, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B,T] log-probabilities aligned with ``ids`` (index i: token i given its prefix; index 0: 0)."""
    return -common.aligned_losses(logits, ids)


def token_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    rejected_weights: torch.Tensor,
    beta: float = 0.1,
    form: str = "sequence",
) -> torch.Tensor:
    """cDPO loss from per-token log-probs [B,T] (see the module docstring for both forms).

    Args:
        policy_*_logps, ref_*_logps: per-token log-probs of the chosen / rejected responses.
        chosen_mask, rejected_mask: bool [B,T], the response tokens.
        rejected_weights: the critical weights ``1 - s_t`` of the rejected tokens [B,T].
        beta: DPO beta (0.1 in the paper).
        form: ``sequence`` (paper) or ``position`` (release; chosen and rejected must share T).
    """
    rw = (policy_chosen_logps - ref_chosen_logps) * chosen_mask
    rl = (policy_rejected_logps - ref_rejected_logps) * rejected_mask * rejected_weights
    if form == "sequence":
        return -F.logsigmoid(beta * (rw.sum(-1) - rl.sum(-1))).mean()
    if form == "position":
        if rw.shape != rl.shape:
            raise ValueError(f"cdpo: form 'position' pairs tokens by position; got shapes {tuple(rw.shape)} and {tuple(rl.shape)}")
        return -F.logsigmoid(beta * (rw - rl)).mean()
    raise ValueError(f"cdpo: form must be 'sequence' or 'position', got {form!r}")


@dataclass
class CriticalParams(common.LMParams):
    """Args (plus ``LMParams``; ``model``/``gguf_file`` are unused defaults, the two models below are scored):
    positive_model, positive_gguf_file: the model fine-tuned on correct trajectories.
    negative_model, negative_gguf_file: the model fine-tuned on incorrect trajectories.
    beta: contrast strength beta_CE (1 in the release).
    """

    positive_model: str = common.SMOLLM2
    positive_gguf_file: str | None = None
    negative_model: str = common.SMOLLM2
    negative_gguf_file: str | None = None
    beta: float = 1.0


@register("critical", kind="map", params=CriticalParams)
class CriticalStage:
    """Offline critical-token weights ``1 - s_t`` of every response token (prompt-less rows: all tokens)."""

    def __init__(self, params: CriticalParams):
        self.p = params
        self.pos, _ = common.load_lm(params, params.positive_model, params.positive_gguf_file)
        self.neg, _ = common.load_lm(params, params.negative_model, params.negative_gguf_file)

    @classmethod
    def needs(cls, p: CriticalParams) -> list[str]:
        return [schema.INPUT_IDS]

    @classmethod
    def adds(cls, p: CriticalParams) -> list[str]:
        return [schema.TOKEN_WEIGHTS]

    @torch.no_grad()
    def __call__(self, batch):
        seqs, plens = common.read_sequences(batch, "critical")
        out = [np.zeros(len(s), np.float32) for s in seqs]
        for lo, hi in common.chunks(len(seqs), self.p.batch_size):
            w = critical_weights(self.pos, self.neg, [s[: self.p.max_length] for s in seqs[lo:hi]], plens[lo:hi], self.p.beta)
            for r, wr in enumerate(w):
                out[lo + r][: len(wr)] = wr
        return common.with_token_weights(batch, out)


@torch.no_grad()
def critical_weights(pos, neg, sequences: list[np.ndarray], prompt_lengths, beta: float = 1.0) -> list[np.ndarray]:
    """``1 - s_t`` at the scored positions of each sequence (0 elsewhere), one padded forward per model."""
    device = next(pos.parameters()).device
    ids, mask = common.pad(sequences, device)
    zp = pos(input_ids=ids, attention_mask=mask).logits
    zn = neg(input_ids=ids, attention_mask=mask).logits
    s = F.pad(contrastive_scores(zp[:, :-1], zn[:, :-1], ids[:, 1:], beta), (1, 0))
    scored = common.scored_mask(mask.sum(1), torch.as_tensor(np.asarray(prompt_lengths), device=device), ids.shape[1])
    w = ((1 - s) * scored).cpu().numpy().astype(np.float32)
    return [w[r, : len(seq)] for r, seq in enumerate(sequences)]
