"""Token-level DPO (cDPO, Lin et al. "Critical Tokens Matter", arXiv 2411.19943, ICML 2025): one micro-batch.

With per-token log-ratios ``r_t = log pi(y_t) - log pi_ref(y_t)`` of the policy against the frozen reference
on the response tokens of a pair's chosen (w) and rejected (l) sides, and the critical-token weights
``w_t = 1 - s_t`` on the rejected side (``rejected_token_weights`` from the ``critical`` stage; the chosen side
is unweighted, the release's ``only_neg``), the loss is ``tokensift.scorers.critical.token_dpo_loss``:

- ``sequence`` (the paper): ``L = -mean_b log sigma(beta * (sum_t r^w_t - sum_t w_t r^l_t))``;
- ``position`` (the release's ``CDPOTrainer``): ``L = -mean_{b,t} log sigma(beta * (r^w_t - w_t r^l_t))``.

beta = 0.1 (the paper). The reference is the policy's initial weights (the release: the PEFT base model) or a
model loaded from a path. Pairs come from :class:`tokensift.trainers.pairs.PairLoader`.
"""

from __future__ import annotations

import torch

from tokensift.models.packing import packed_logits
from tokensift.scorers.critical import token_dpo_loss
from tokensift.trainers.losses import token_cross_entropy


def pair_logps(model: torch.nn.Module, batch: dict, module: torch.nn.Module | None = None):
    """Per-token log-probs ``log p(labels[t] | ids[:t+1])`` (fp32) of the chosen and the rejected sides, from one
    forward over both (``[2B, L]``); ``module`` is the ``nn.Module`` under ``model`` when that is a wrapper."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    logps = -token_cross_entropy(packed_logits(model, {"input_ids": ids}, module), labels)
    return logps.chunk(2)


def dpo_micro_batch_loss(
    policy: torch.nn.Module, reference: torch.nn.Module, batch: dict, beta: float = 0.1, form: str = "sequence",
    module: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``(loss, stats)`` of one micro-batch of pairs; ``stats``: summed ``margin`` and ``accuracy`` over pairs.

    Args:
        policy: the model trained (the DeepSpeed engine or the module).
        module: the ``nn.Module`` under ``policy`` when ``policy`` is a DeepSpeed engine.
        reference: the frozen reference model.
        batch: a :class:`~tokensift.trainers.pairs.PairLoader` batch on the model's device.
        beta: DPO beta.
        form: ``sequence`` or ``position``.

    The margin of a pair is ``sum_t r^w_t - sum_t w_t r^l_t`` (the sequence form's logit over beta); it
    grows as the policy prefers the chosen response more than the reference does.
    """
    chosen, rejected = pair_logps(policy, batch, module)
    with torch.no_grad():
        ref_chosen, ref_rejected = pair_logps(reference, batch)
    cm, rm, w = batch["chosen_mask"], batch["rejected_mask"], batch["rejected_weights"]
    loss = token_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cm, rm, w, beta=beta, form=form)
    with torch.no_grad():
        margin = ((chosen - ref_chosen) * cm).sum(-1) - ((rejected - ref_rejected) * rm * w).sum(-1)
    return loss, {"margin": float(margin.sum()), "accuracy": float((margin > 0).sum()), "pairs": float(len(margin))}
