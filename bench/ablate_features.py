"""Trainer-feature arms, reusing colleague benchmarks rather than rewriting them.

- MoE balancing: ``bench.moe_specialisation`` (its data, model, training loop and metrics), run for each
  seed with micro-batch and with global-batch load balancing: NMI(domain; expert), max/mean expert load,
  heldout bits per byte.
- MoD vs dense: ``bench.mod``'s models, data and training loop; per seed the dense GPT and the MoD GPT
  trained for the same steps, and a MoD GPT trained for ``steps * F_dense / F_mod`` steps (equal training
  FLOPs, with ``F`` = ``GPT.flops_per_token``; training FLOPs are ~3x forward for both). Heldout bits per
  byte with the MoD model's causal (sampling-time) routing.
"""

from __future__ import annotations

import importlib
import time

import numpy as np


def moe(seeds: list[int], steps: int, heldout_windows: int) -> dict[str, list[dict]]:
    """Mode (``micro`` / ``global``) -> one dict per seed: ``bench.moe_specialisation.evaluate``'s metrics
    (NMI(domain; expert), max/mean load, heldout loss) and ``seconds``; data prepared as that module does."""
    from bench import moe_specialisation as ms

    encode = ms.smollm2_compact_encoder()
    train_texts, heldout_texts = ms.load_texts(False, encode=encode), ms.load_texts(True, encode=encode)
    tokens, domains = ms.windows(heldout_texts, heldout_windows * len(ms.DOMAINS), ms.SEQ_LEN,
                                 np.random.default_rng(123))
    out: dict[str, list[dict]] = {"micro": [], "global": []}
    for seed in seeds:
        for mode in out:
            t0 = time.perf_counter()
            metrics = ms.evaluate(ms.train(mode, steps, train_texts, seed=seed), tokens, domains)
            out[mode].append({**metrics, "seconds": time.perf_counter() - t0})
    return out


def mod(seeds: list[int], steps: int, heldout_windows: int) -> dict[str, list[dict]]:
    """Arm (``dense``, ``mod_equal_steps``, ``mod_equal_flops``) -> per seed ``bits_per_byte``, ``steps``,
    ``train_flops`` (forward FLOPs/token x 3 x tokens) and ``seconds``; ``ImportError`` without ``bench.mod``."""
    import torch

    bm = importlib.import_module("bench.mod")
    from tokensift.models.gpt import GPT, GPTConfig, MoDConfig

    train_texts, heldout_texts = bm.load_texts(False, bm.SEQ_LEN), bm.load_texts(True, bm.SEQ_LEN)
    heldout, _ = bm.windows(heldout_texts, heldout_windows, bm.SEQ_LEN, np.random.default_rng(123))
    base = dict(vocab_size=256, block_size=bm.SEQ_LEN, n_layer=8, n_head=4, n_embd=96, dropout=0.0)  # as bench.mod
    flops = {False: GPT(GPTConfig(**base)).flops_per_token(bm.SEQ_LEN),
             True: GPT(GPTConfig(**base, mod=MoDConfig())).flops_per_token(bm.SEQ_LEN)}
    arms = {"dense": (False, steps), "mod_equal_steps": (True, steps),
            "mod_equal_flops": (True, round(steps * flops[False] / flops[True]))}
    out: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in seeds:
        for arm, (routed, n) in arms.items():
            torch.manual_seed(seed)
            model = GPT(GPTConfig(**base, mod=MoDConfig() if routed else None))
            t0 = time.perf_counter()
            bm._train(model, n, train_texts)
            out[arm].append({"bits_per_byte": bm._bits_per_byte(model, heldout), "steps": n,
                             "train_flops": 3 * flops[routed] * n * 8 * bm.SEQ_LEN, "seconds": time.perf_counter() - t0})
    return out
