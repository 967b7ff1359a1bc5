"""ESLM's saved compute: LM-head FLOPs and time of the kept-token loss vs the dense token loss.

Ours: score every token from logits computed without gradient, keep the top ``1 - alpha`` (ESLM, loss
score, alpha 0.5) and take the loss through ``tokensift.trainers.losses.kept_head_loss`` (the scoring logits are
reused; the head's backward runs on kept rows only). Anchor: the same scoring, then the usual masked loss,
``sum(w * CE(head(h))) / sum(w)`` with gradient through the full logits. FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` (matmuls of forward and backward), not by formula; the formula
of ``losses.head_flops`` is reported next to them. Hidden states are random (FLOPs and time do not depend on
values); sizes are SmolLM2's head (576 x 49,152).
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from tokensift.scorers import eslm
from tokensift.trainers import losses


def _setup(n: int, d: int, v: int):
    torch.manual_seed(0)
    head = torch.nn.Linear(d, v, bias=False)
    hidden = torch.randn(n, d, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    return head, hidden, labels


def _ours(head, hidden, labels, alpha):
    with torch.no_grad():
        logits = head(hidden)
        loss = F.cross_entropy(logits, labels, reduction="none")
    keep = eslm.select_mask(loss, alpha).float()
    losses.kept_head_loss(hidden, head, logits, labels, keep).backward()


def _anchor(head, hidden, labels, alpha):
    with torch.no_grad():
        loss = F.cross_entropy(head(hidden), labels, reduction="none")
    keep = eslm.select_mask(loss, alpha).float()
    ((keep * F.cross_entropy(head(hidden), labels, reduction="none")).sum() / keep.sum()).backward()


def _flops(fn, *args) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args)
    return counter.get_total_flops()


def _time(fn, args, repeats: int) -> float:
    fn(*args)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - t0) / repeats


def run(quick: bool = False) -> list[dict]:
    n, d, v, alpha = (256, 576, 49152, 0.5) if quick else (2048, 576, 49152, 0.5)
    repeats = 2 if quick else 5
    args = (*_setup(n, d, v), alpha)
    ours_f, anchor_f = _flops(_ours, *args), _flops(_anchor, *args)
    formula = losses.head_flops(n, n - int(alpha * n), d, v)
    ours_t, anchor_t = _time(_ours, args, repeats), _time(_anchor, args, repeats)
    size = f"{n} tokens, head {d}x{v}, alpha {alpha}"
    return [
        {
            "measure": f"ESLM LM-head FLOPs per step incl. scoring forward ({size})",
            "ours": round(ours_f / 1e9, 3),
            "anchor": round(anchor_f / 1e9, 3),
            "unit": "GFLOP",
            "ratio": round(anchor_f / ours_f, 3),
            "note": f"ratio = anchor / ours (above 1: fewer FLOPs); counted by FlopCounterMode; formula "
            f"head_flops: ours {formula['kept'] / 1e9:.3f}, dense without the separate scoring pass "
            f"{formula['dense'] / 1e9:.3f}; saved {formula['saved'] / 1e9:.3f} GFLOP",
        },
        {
            "measure": f"ESLM LM-head loss + backward time ({size})",
            "ours": round(ours_t * 1000, 1),
            "anchor": round(anchor_t * 1000, 1),
            "unit": "ms/step",
            "ratio": round(anchor_t / ours_t, 2),
            "note": "ratio = anchor time / ours (above 1: faster); anchor = masked CE through the full logits",
        },
    ]


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
