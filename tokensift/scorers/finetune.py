"""A brief completion-only fine-tune of an HF causal LM: the tuned copies of SHAD (shuffle-tuned) and of
cDPO's contrastive estimation (positive / negative models) are made with it."""

from __future__ import annotations

import random

import numpy as np
import torch

from tokensift.scorers import common


def finetune_lm(
    model,
    sequences: list[np.ndarray],
    prompt_lengths: np.ndarray,
    steps: int,
    lr: float,
    batch_size: int = 4,
    last_layers: int | None = None,
    seed: int = 0,
) -> list[float]:
    """Briefly fine-tune ``model`` in place on the response tokens of ``sequences`` (completion-only SFT).

    Args:
        model: an HF causal LM (its decoder layers at ``model.model.layers``).
        sequences, prompt_lengths: token ids and prompt lengths; the loss covers tokens ``i >= max(p, 1)``.
        steps: optimizer steps (AdamW, weight decay 0), each on ``batch_size`` sequences drawn with ``seed``.
        last_layers: train only the last N decoder layers and the final norm (``None``: every parameter).

    Returns the training loss of every step. The model is left in eval mode.
    """
    device = next(model.parameters()).device
    params = list(model.parameters())
    if last_layers is not None:
        for q in params:
            q.requires_grad_(False)
        inner = model.get_decoder()
        trainable = [inner.layers[-last_layers:], inner.norm]
        params = [q for m in trainable for q in m.parameters()]
        for q in params:
            q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            extra = list(range(len(sequences)))
            rng.shuffle(extra)
            order += extra
        idx, order = order[:batch_size], order[batch_size:]
        ids, mask = common.pad([sequences[i] for i in idx], device)
        lengths = mask.sum(1)
        keep = common.scored_mask(lengths, torch.as_tensor(prompt_lengths[idx], device=device), ids.shape[1])
        loss = common.aligned_losses(model(input_ids=ids, attention_mask=mask).logits, ids)[keep].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    for q in model.parameters():
        q.requires_grad_(True)
    return losses
