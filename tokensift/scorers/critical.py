"""Critical tokens / cDPO (Lin et al., "Critical Tokens Matter", arXiv 2411.19943, ICML 2025).

Contrastive estimation: a positive model and a negative model are fine-tuned from the base model on correct
and on incorrect trajectories (the release: LoRA SFT r=8 on the MLP projections, lr 3e-4, one epoch; here,
with ``tune_paths``, a brief full (or last-layers) completion-only fine-tune of two copies of ``model``:
:mod:`tokensift.scorers.finetune`; or two saved models). For every response token y_t, with
``z_pos``, ``z_neg`` the two models' logits predicting it and beta_CE = 1 (hard-coded in the release),

    s_t = softmax_v((1 + beta) * z_pos - beta * z_neg)[y_t]  =  p_pos(y_t)^(1+b) / p_neg(y_t)^b / Z

and the critical-token weight of a rejected-trajectory token is ``1 - s_t`` (high where the negative model
is much more likely than the positive one). The offline stage writes ``token_weights = 1 - s_t`` on the
response tokens (0 on the prompt and index 0); with ``pairs: true`` it scores the rejected side of
preference pairs (``rejected_input_ids``, the tokenize stage's ``rejected_column``) into
``rejected_token_weights``, what ``tokensift train`` with ``objective: token_dpo`` weighs the rejected tokens by.

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

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tokensift.pipeline import schema
from tokensift.pipeline.registry import register
from tokensift.pipeline.tokenize import REJECTED
from tokensift.scorers import common, finetune


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
    """Args (plus ``LMParams``; ``model`` is the base model the two are tuned from with ``tune_paths``):
    positive_model, positive_gguf_file: a saved model fine-tuned on correct trajectories (without ``tune_paths``).
    negative_model, negative_gguf_file: a saved model fine-tuned on incorrect trajectories.
    tune_paths: files/dirs (Parquet, JSONL) of pairs to tune the positive (on ``response_column``) and the
        negative model (on ``rejected_column``) from ``model``.
    prompt_column, response_column, rejected_column: those columns of ``tune_paths``.
    tune_steps, tune_lr, tune_batch_size: each brief fine-tune (AdamW).
    tune_last_layers: train only the last N decoder layers (``None``: the whole model).
    beta: contrast strength beta_CE (1 in the release).
    pairs: score the rejected side of preference pairs into ``rejected_token_weights``.
    seed: tuning seed.
    """

    positive_model: str = common.SMOLLM2
    positive_gguf_file: str | None = None
    negative_model: str = common.SMOLLM2
    negative_gguf_file: str | None = None
    tune_paths: list[str] = field(default_factory=list)
    prompt_column: str = "prompt"
    response_column: str = "response"
    rejected_column: str = "rejected"
    tune_steps: int = field(default=60, metadata={"ge": 1})
    tune_lr: float = field(default=1e-4, metadata={"gt": 0.0})
    tune_batch_size: int = field(default=4, metadata={"ge": 1})
    tune_last_layers: int | None = None
    beta: float = field(default=1.0, metadata={"ge": 0.0})
    pairs: bool = False
    seed: int = 0


@register("critical", kind="map", params=CriticalParams)
class CriticalStage:
    """Offline critical-token weights ``1 - s_t`` of every response token (prompt-less rows: all tokens)."""

    def __init__(self, params: CriticalParams):
        self.p = params
        if params.tune_paths:
            base, tok = common.load_lm(params)
            self.pos, self.neg = (self._tuned(base, tok.name_or_path, c) for c in (params.response_column, params.rejected_column))
        else:
            self.pos, _ = common.load_lm(params, params.positive_model, params.positive_gguf_file)
            self.neg, _ = common.load_lm(params, params.negative_model, params.negative_gguf_file)

    def _tuned(self, base, tokenizer: str, column: str):
        """A copy of ``base`` fine-tuned on prompt + ``column`` of the tuning pairs (response tokens only)."""
        p = self.p
        rows = finetune.read_tune_rows(list(p.tune_paths), p.prompt_column, [p.response_column, p.rejected_column], "critical")
        seqs, plens = finetune.tokenized_pairs(rows, tokenizer, p.prompt_column, column, p.max_length)
        model = copy.deepcopy(base)
        finetune.finetune_lm(model, seqs, plens, p.tune_steps, p.tune_lr, p.tune_batch_size, p.tune_last_layers, p.seed)
        return model

    @classmethod
    def needs(cls, p: CriticalParams) -> list[str]:
        return [REJECTED + schema.INPUT_IDS, schema.PROMPT_LENGTH] if p.pairs else [schema.INPUT_IDS]

    @classmethod
    def adds(cls, p: CriticalParams) -> list[str]:
        return [REJECTED + schema.TOKEN_WEIGHTS] if p.pairs else [schema.TOKEN_WEIGHTS]

    @torch.no_grad()
    def __call__(self, batch):
        column = REJECTED + schema.INPUT_IDS if self.p.pairs else schema.INPUT_IDS
        seqs, plens = common.read_sequences(batch, "critical", column)
        out = [np.zeros(len(s), np.float32) for s in seqs]
        for lo, hi in common.chunks(len(seqs), self.p.batch_size):
            w = critical_weights(self.pos, self.neg, [s[: self.p.max_length] for s in seqs[lo:hi]], plens[lo:hi], self.p.beta)
            for r, wr in enumerate(w):
                out[lo + r][: len(wr)] = wr
        return common.with_token_weights(batch, out, REJECTED + schema.TOKEN_WEIGHTS if self.p.pairs else schema.TOKEN_WEIGHTS)


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
