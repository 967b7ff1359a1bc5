"""One training step with the weighted loss against a plain cross-entropy step.

Ours: ``tokensift.trainers.step.micro_batch_loss`` (forward to the final hidden states, LM head on the
weighted rows only, ``sum(w*ce)/sum(w)``) + backward + AdamW. Anchor: the usual step, full logits and
``F.cross_entropy(logits, labels)`` + backward + AdamW. Same built-in GPT (4 layers, 128 wide, a
49,152-token vocabulary as SmolLM2's), same random token batch (timing does not depend on the ids). Two
weightings: all ones (the cost of weighting) and a 50 % mask (ESLM at alpha 0.5: the LM head's forward
and backward only run on kept rows).
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from tokensift.models.gpt import GPT
from tokensift.models.gpt_config import GPTConfig
from tokensift.trainers.step import micro_batch_loss


def _best_times(steps: list, repeats: int) -> list[float]:
    """Least process CPU time (all threads) of ``repeats`` runs of each step, interleaved: robust to other
    work on a shared machine, unlike wall time."""
    for step in steps:
        step()  # warm-up (AdamW state, allocator)
    best = [float("inf")] * len(steps)
    for _ in range(repeats):
        for i, step in enumerate(steps):
            t0 = time.process_time()
            step()
            best[i] = min(best[i], time.process_time() - t0)
    return best


def run(quick: bool = False) -> list[dict]:
    B, T, V = (2, 128, 49152) if quick else (8, 256, 49152)
    repeats = 3 if quick else 5
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=4, n_head=4, n_embd=128)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, labels = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))

    def plain():
        F.cross_entropy(model(ids).reshape(-1, V), labels.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def weighted(w):
        def step():
            micro_batch_loss(model, model, {"input_ids": ids, "labels": labels, "loss_weights": w})[0].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    masks = (("all weights 1", torch.ones(B, T)), ("50% mask", (torch.rand(B, T) < 0.5).float()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no spinning worker threads in the CPU-time measure
    try:
        anchor, *ours = _best_times([plain] + [weighted(w) for _, w in masks], repeats)
    finally:
        torch.set_num_threads(threads)
    rows = []
    for (name, _), t in zip(masks, ours, strict=True):
        rows.append({
            "measure": f"weighted-loss train step, {name} (GPT 4x128, vocab {V}, {B}x{T})",
            "ours": round(t * 1000, 1),
            "anchor": round(anchor * 1000, 1),
            "unit": "CPU ms/step",
            "ratio": round(anchor / t, 2),
            "note": "ratio = anchor time / ours (above 1: faster); anchor = full-logits F.cross_entropy step; "
                    "one thread, CPU seconds (process_time), least of interleaved repeats",
        })
    return rows


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
