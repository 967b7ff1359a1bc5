"""Weighted LM losses: hand-computed values, global normalisation across accumulation, the kept-row LM head."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokensift.models.gpt import GPT
from tokensift.models.gpt_config import GPTConfig
from tokensift.trainers import losses
from tokensift.trainers.losses import global_denominator, token_cross_entropy, weighted_loss
from tokensift.trainers.step import micro_batch_loss


def test_token_cross_entropy_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [2.0, 2.0]]])
    labels = torch.tensor([[0, 1]])
    # softmax([0, ln 3]) = [1/4, 3/4]; softmax([2, 2]) = [1/2, 1/2]
    torch.testing.assert_close(token_cross_entropy(logits, labels), torch.tensor([[math.log(4.0), math.log(2.0)]]))
    assert token_cross_entropy(logits.bfloat16(), labels).dtype == torch.float32


def test_weighted_loss_by_hand():
    ce = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    w = torch.tensor([[0.0, 1.0], [0.5, 1.0]])
    assert weighted_loss(ce, w).item() == pytest.approx((2 + 1.5 + 4) / 2.5)
    assert weighted_loss(ce, w, "tokens").item() == pytest.approx((2 + 1.5 + 4) / 4)
    assert weighted_loss(ce, w, "global", torch.tensor(5.0)).item() == pytest.approx(7.5 / 5)
    nothing = weighted_loss(ce, torch.zeros_like(w))
    nothing.backward()
    assert nothing.item() == 0.0 and torch.equal(ce.grad, torch.zeros_like(ce))
    with pytest.raises(ValueError, match="needs the denominator"):
        weighted_loss(ce, w, "global")
    with pytest.raises(ValueError, match="normalize must be one of"):
        weighted_loss(ce, w, "mean")


def test_global_normalisation_weighs_every_kept_token_of_the_step_equally():
    """Accumulating G micro-batch losses (DeepSpeed divides each by G) gives the full step's weighted mean."""
    torch.manual_seed(0)
    theta = torch.randn(3, 5, requires_grad=True)
    ce = [(theta[i] ** 2 + i) for i in range(3)]  # three micro-batches of 5 token losses
    w = [torch.tensor(m) for m in ([1.0, 1, 1, 1, 1], [0.0, 0, 1, 0, 0], [0.5, 1, 0, 0, 1])]  # 5, 1, 2.5 kept
    G = len(ce)
    target = torch.autograd.grad(sum((c * x).sum() for c, x in zip(ce, w, strict=True)) / sum(x.sum() for x in w), theta,
                                 retain_graph=True)[0]
    den = global_denominator([x.sum() for x in w], G)
    assert den.item() == pytest.approx(8.5 / G)
    grad_global = torch.autograd.grad(sum(weighted_loss(c, x, "global", den) / G for c, x in zip(ce, w, strict=True)), theta,
                                      retain_graph=True)[0]
    torch.testing.assert_close(grad_global, target)
    grad_micro = torch.autograd.grad(sum(weighted_loss(c, x) / G for c, x in zip(ce, w, strict=True)), theta)[0]
    assert not torch.allclose(grad_micro, target)  # per-micro-batch means overweight the sparse micro-batch


def _tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16))


def test_kept_rows_through_the_head_match_full_logits():
    model = _tiny_gpt()
    ids = torch.randint(0, 50, (3, 16))
    labels = torch.randint(0, 50, (3, 16))
    w = (torch.rand(3, 16) > 0.6).float() * torch.rand(3, 16)
    batch = {"input_ids": ids, "labels": labels, "loss_weights": w}

    loss, token_loss, weights = micro_batch_loss(model, model, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    full = weighted_loss(token_cross_entropy(model(ids), labels), w)
    full_grads = torch.autograd.grad(full, list(model.parameters()))
    torch.testing.assert_close(loss, full)
    for a, b in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert torch.equal(token_loss == 0, w == 0)


class _TopHalf:
    """A test scorer (the online protocol): keeps the half of the valid tokens with the highest loss."""

    def __init__(self):
        self.seen = []

    def __call__(self, token_loss, logits, weights, batch, model):
        self.seen.append((token_loss.requires_grad, logits.shape))
        return (token_loss >= token_loss[weights > 0].median()).float() * (weights > 0)


@pytest.mark.parametrize("hidden_path", [True, False])
def test_online_scorer_weights_enter_the_loss(hidden_path):
    model = _tiny_gpt()
    engine = model if hidden_path else (lambda input_ids: model(input_ids))
    ids, labels = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    batch = {"input_ids": ids, "labels": labels, "loss_weights": torch.ones(2, 16)}
    scorer = _TopHalf()
    loss, _, weights = micro_batch_loss(engine, model if hidden_path else torch.nn.Identity(), batch, scorer)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ce = token_cross_entropy(model(ids), labels)
    keep = ce.detach() >= ce.detach().median()
    assert torch.equal(weights.bool(), keep)
    torch.testing.assert_close(loss, ce[keep].mean())
    for a, b in zip(grads, torch.autograd.grad(ce[keep].mean(), list(model.parameters())), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert scorer.seen == [(False, (2, 16, 50))]
    # the global normalisation rescales the same kept-row loss
    den = torch.tensor(float(keep.sum()) / 4)
    scaled, _, _ = micro_batch_loss(engine, model if hidden_path else torch.nn.Identity(), batch, _TopHalf(), "global", den)
    torch.testing.assert_close(scaled, 4 * ce[keep].mean().detach())


def test_kept_head_loss_matches_dense_gradient_and_skips_unkept_rows():
    g = torch.Generator().manual_seed(0)
    B, T, C, V = 2, 7, 5, 11
    hidden = torch.randn(B, T, C, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(C, V, bias=True).double()
    labels = torch.randint(0, V, (B, T), generator=g)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) * (torch.rand(B, T, generator=g) > 0.4)
    with torch.no_grad():
        logits = head(hidden)
    loss = losses.kept_head_loss(hidden, head, logits, labels, weights)
    loss.backward()
    ours = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad = None
    head.zero_grad()
    ce = F.cross_entropy(head(hidden).transpose(1, 2), labels, reduction="none")
    dense = (weights * ce).sum() / weights.sum()
    dense.backward()
    assert loss.item() == pytest.approx(dense.item(), rel=1e-12)
    for a, b in zip(ours, [hidden.grad, head.weight.grad, head.bias.grad], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.all(ours[0][weights == 0] == 0)


def test_head_flops_hand_computed():
    f = losses.head_flops(n_tokens=100, n_kept=30, d_model=8, vocab=50)
    assert f == {"dense": 3 * 2 * 8 * 50 * 100, "kept": 2 * 8 * 50 * 100 + 4 * 8 * 50 * 30, "saved": 4 * 8 * 50 * 70}
