"""SHAD + RFT (Ye et al., arXiv 2412.14780, ACL Findings 2025): boilerplate vs reasoning tokens.

SHAD (shuffle-aware discriminator), offline:
  1. take a small share of the training pairs (the paper: ~1%) and shuffle input <-> output across them,
     so prompt i is paired with the response of sample pi(i) (pi a derangement);
  2. fine-tune a copy of the original model briefly on these shuffled pairs (response tokens only): it
     learns what is predictable *without* the matching input, i.e. the format and template tokens;
  3. for every response token of every correctly paired sample, ``LD = l_shuffled - l_original``;
     ``LD <= 0`` -> boilerplate, ``LD > 0`` -> reasoning (input-dependent).

RFT (reasoning-highlighted fine-tuning), online: with ``L_b`` and ``L_r`` the mean CE of a micro-batch's
boilerplate and reasoning tokens, ``(w_b, w_r) = softmax([L_b, L_r] / tau)`` (detached) and
``L = w_b * L_b + w_r * L_r``; the paper finds 1/tau in [0.2, 0.5] robust (tau 2..5; default 3). A batch with
one class empty falls back to the plain mean. No reference code exists; the per-class means, detached
weights and per-micro-batch scope are the research note's reading of the paper.

Class code: the stage writes ``token_weights`` 1 for reasoning, ``boilerplate_weight`` (0 < b < 1, default
0.5) for boilerplate and 0 for the prompt and index 0; used directly it is the paper's fixed-weight
ablation (SHAD + alpha-FT), and :class:`RFTScorer` reads the classes back from it (0 < w < 1 -> boilerplate,
w >= 1 -> reasoning).
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from tokensift.models.causal_lm import token_losses
from tokensift.pipeline import schema
from tokensift.pipeline.registry import register
from tokensift.scorers import common, finetune


def shuffle_pairs(
    sequences: list[np.ndarray], prompt_lengths: np.ndarray, seed: int = 0
) -> tuple[list[np.ndarray], np.ndarray]:
    """Prompt ``i`` + response ``pi(i)`` for a seeded derangement ``pi`` (needs >= 2 samples)."""
    n = len(sequences)
    if n < 2:
        raise ValueError(f"shad: shuffling input/output pairs needs at least 2 samples, got {n}")
    rng = random.Random(seed)
    perm = list(range(n))
    while any(i == j for i, j in enumerate(perm)):
        rng.shuffle(perm)
    out = [np.concatenate([sequences[i][: prompt_lengths[i]], sequences[j][prompt_lengths[j] :]]) for i, j in enumerate(perm)]
    return out, np.asarray(prompt_lengths)[: n].copy()


def shuffle_tune(model, sequences, prompt_lengths, steps: int, lr: float, batch_size: int, last_layers, seed: int):
    """A copy of ``model`` fine-tuned on the shuffled pairs (SHAD step 2); ``model`` is unchanged."""
    shuffled, plens = shuffle_pairs(sequences, prompt_lengths, seed)
    tuned = copy.deepcopy(model)
    finetune.finetune_lm(tuned, shuffled, plens, steps, lr, batch_size, last_layers, seed)
    return tuned


def loss_difference(original, shuffled, sequences: list[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
    """``LD[i] = l_shuffled(i) - l_original(i)`` per sequence, aligned (index 0 = 0)."""
    lo = token_losses(original, [list(s) for s in sequences], batch_size)
    ls = token_losses(shuffled, [list(s) for s in sequences], batch_size)
    return [np.concatenate([[0.0], b - a]).astype(np.float32) for a, b in zip(lo, ls, strict=True)]


def shad_weights(ld: np.ndarray, prompt_length: int, boilerplate_weight: float) -> np.ndarray:
    """Class-coded weights: 1 where ``LD > 0`` (reasoning), ``boilerplate_weight`` where ``LD <= 0``, 0 on the prompt."""
    w = np.where(ld > 0, 1.0, boilerplate_weight).astype(np.float32)
    w[: max(int(prompt_length), 1)] = 0.0
    return w


def rft_loss(token_loss: torch.Tensor, reasoning: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """``w_b * L_b + w_r * L_r`` with ``w = softmax([L_b, L_r] / tau)`` detached; plain mean if a class is empty."""
    b, r = valid & ~reasoning, valid & reasoning
    if not bool(b.any()) or not bool(r.any()):
        return token_loss[valid].mean()
    means = torch.stack([token_loss[b].mean(), token_loss[r].mean()])
    w = torch.softmax(means.detach() / tau, 0)
    return (w * means).sum()


@dataclass
class SHADParams(common.LMParams):
    """Args (plus ``LMParams``; ``model`` is the original model):
    tune_paths: files/dirs (Parquet, JSONL) with prompt/response columns to draw the shuffled pairs from.
    prompt_column, response_column: those columns (rows where either is null are skipped).
    tune_fraction: share of those rows shuffled and tuned on (the paper: ~1%).
    tune_min_rows: at least this many rows (when available).
    tune_steps, tune_lr, tune_batch_size: the brief fine-tune (AdamW).
    tune_last_layers: train only the last N decoder layers (``None``: the whole model).
    shuffled_model: a saved shuffle-tuned model to load instead of tuning (then ``tune_paths`` is unused).
    boilerplate_weight: the weight written for boilerplate tokens (reasoning: 1).
    seed: sampling, shuffling and tuning seed.
    """

    tune_paths: list[str] = field(default_factory=list)
    prompt_column: str = "prompt"
    response_column: str = "response"
    tune_fraction: float = 0.01
    tune_min_rows: int = 32
    tune_steps: int = 100
    tune_lr: float = 1e-5
    tune_batch_size: int = 8
    tune_last_layers: int | None = None
    shuffled_model: str | None = None
    boilerplate_weight: float = 0.5
    seed: int = 0


@register("shad", kind="map", params=SHADParams)
class SHADStage:
    """Offline SHAD: class-coded ``token_weights`` from the loss difference of a shuffle-tuned copy."""

    def __init__(self, params: SHADParams):
        if not 0 < params.boilerplate_weight < 1:
            raise ValueError(f"shad: boilerplate_weight must be in (0, 1), got {params.boilerplate_weight}")
        if not params.tune_paths and not params.shuffled_model:
            raise ValueError("shad: set tune_paths (data to shuffle-tune on) or shuffled_model")
        self.p = params
        self.model, tok = common.load_lm(params)
        if params.shuffled_model:
            self.shuffled, _ = common.load_lm(params, params.shuffled_model, None)
        else:
            seqs, plens = self._tune_set(tok.name_or_path)
            self.shuffled = shuffle_tune(
                self.model, seqs, plens, params.tune_steps, params.tune_lr, params.tune_batch_size,
                params.tune_last_layers, params.seed,
            )

    def _tune_set(self, tokenizer: str) -> tuple[list[np.ndarray], np.ndarray]:
        p = self.p
        rows = finetune.read_tune_rows(list(p.tune_paths), p.prompt_column, [p.response_column], "shad")
        n = min(rows.num_rows, max(p.tune_min_rows, math.ceil(p.tune_fraction * rows.num_rows)))
        pick = sorted(random.Random(p.seed).sample(range(rows.num_rows), n))
        return finetune.tokenized_pairs(rows.take(pa.array(pick)), tokenizer, p.prompt_column, p.response_column, p.max_length)

    @classmethod
    def needs(cls, p: SHADParams) -> list[str]:
        return [schema.INPUT_IDS, schema.PROMPT_LENGTH]

    @classmethod
    def adds(cls, p: SHADParams) -> list[str]:
        return [schema.TOKEN_WEIGHTS]

    def __call__(self, batch):
        seqs, plens = common.read_sequences(batch, "shad")
        cut = [s[: self.p.max_length] for s in seqs]
        lds = loss_difference(self.model, self.shuffled, cut, self.p.batch_size)
        out = []
        for s, ld, p in zip(seqs, lds, plens, strict=True):
            w = np.zeros(len(s), np.float32)
            w[: len(ld)] = shad_weights(ld, p, self.p.boilerplate_weight)
            out.append(w)
        return common.with_token_weights(batch, out)


@dataclass
class RFTParams:
    """Args:
    tau: softmax temperature over the two class losses (the paper: 1/tau in [0.2, 0.5]).
    """

    tau: float = field(default=3.0, metadata={"gt": 0.0})


class RFTScorer:
    """Online RFT: per-token weights ``w_c * n / n_c`` (class c), so ``sum(w*ce)/sum(w)`` is the RFT loss."""

    Params = RFTParams

    def __init__(self, params: RFTParams):
        if params.tau <= 0:
            raise ValueError(f"rft: tau must be > 0, got {params.tau}")
        self.p = params
        self._w = []

    def __call__(self, token_loss, logits, weights, batch, model) -> torch.Tensor:
        valid = weights > 0
        reasoning = weights >= 1
        b, r = valid & ~reasoning, valid & reasoning
        n_b, n_r = int(b.sum()), int(r.sum())
        if n_b == 0 or n_r == 0:
            return valid.to(weights.dtype)
        means = torch.stack([token_loss[b].mean(), token_loss[r].mean()]).detach().float()
        w = torch.softmax(means / self.p.tau, 0)
        self._w.append(float(w[1]))
        n = n_b + n_r
        out = torch.zeros_like(weights)
        out[b] = float(w[0]) * n / n_b
        out[r] = float(w[1]) * n / n_r
        return out

    def on_step_end(self, model) -> None:
        return None

    def stats(self) -> dict[str, float]:
        out = {"rft/reasoning_weight": float(np.mean(self._w))} if self._w else {}
        self._w = []
        return out

    def state_dict(self) -> dict:
        """Empty: RFT's weights depend on the current micro-batch only."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None
