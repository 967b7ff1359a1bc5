"""Fine-tuning harness of the token-level part: SmolLM2 with its top decoder layers trained by the library's
DeepSpeed trainer (``tokensift.trainers.train.train``: loader, online scorers, weighted loss, token-level DPO),
held-out losses, and accounted training FLOPs.

- Model: a copy of the base model with every parameter frozen except the last ``k`` decoder layers and the
  final norm (the tied embedding / LM head stays frozen), so the backward stops at layer ``L - k``. The
  trainer runs unchanged except that its ``build_model`` returns this copy: ``TrainConfig`` has no
  "train only the last k layers" option.
- FLOPs per token (matmuls, Kaplan et al. 2020): forward ``F = 2 (L P_layer + V d) + 2 L T d`` (``P_layer``
  weights per decoder layer, ``V d`` the LM head, ``T`` the sequence length); backward ``B = 2 (2 k P_layer
  + 2 k T d) + 2 V d`` (weight and input gradients of the ``k`` trained layers, the input gradient of the
  frozen head). A run costs ``F`` per position seen plus ``B`` per back-propagated token (non-zero loss
  weight), the accounting of ESLM's paper; frozen models' extra forwards (ssToken's history model, DPO's
  reference) cost ``F`` per position.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from unittest import mock

import numpy as np

from tokensift.config import load
from tokensift.trainers.config import TrainConfig
from tokensift.trainers.metrics import read_metrics


def top_layers_copy(base, k: int):
    """A copy of ``base`` with only its last ``k`` decoder layers and final norm trainable (train mode)."""
    model = copy.deepcopy(base).requires_grad_(False)
    inner = model.get_decoder()
    for module in (inner.layers[-k:], inner.norm):
        module.requires_grad_(True)
    return model.train()


def flops_per_token(config, k: int, seq_len: int) -> tuple[float, float]:
    """``(forward, backward)`` FLOPs per token of a decoder with ``k`` trained top layers (module docstring)."""
    d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    p_layer = 2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size
    forward = 2.0 * (L * p_layer + V * d) + 2.0 * L * seq_len * d
    backward = 2.0 * (2 * k * p_layer + 2 * k * seq_len * d) + 2.0 * V * d
    return forward, backward


def train_config(snapshot: Path, out_dir: Path, seed: int, overrides: list[str]) -> TrainConfig:
    """The trainer config of every arm: fp32 DeepSpeed ZeRO-0 on the CPU, no progress bar (+ ``overrides``)."""
    base = [f"out_dir={out_dir}", f"data.snapshot={snapshot}", f"seed={seed}", "model.kind=hf", "model.path=smollm2",
            "progress=false", "resume=true", "deepspeed.accelerator=cpu"]
    return load(TrainConfig, None, base + overrides)


def train_run(model, cfg: TrainConfig) -> dict:
    """Train ``model`` in place with the library trainer under ``cfg`` (a resumed run continues its checkpoint).

    Returns the run's per-step records so far (``metrics.jsonl``) and the wall seconds of this call.
    """
    from tokensift.trainers import train as trainer

    t0 = time.perf_counter()
    with mock.patch.object(trainer, "build_model", lambda _cfg: model.train()):
        trainer.train(cfg)
    model.eval()
    return {"records": read_metrics(Path(cfg.out_dir) / "metrics.jsonl"), "seconds": time.perf_counter() - t0}


def run_cost(records: list[dict], positions_per_step: int, fwd: float, bwd: float, extra_forwards: int = 0) -> dict:
    """Positions, back-propagated tokens and accounted FLOPs of ``records`` (one per optimizer step).

    Args:
        records: the trainer's metric records (``kept_fraction * tokens`` back-propagated for SFT; the
            response tokens, ``tokens``, for token-level DPO, which has no ``kept_fraction``).
        positions_per_step: positions run through the trained model per step.
        fwd, bwd: :func:`flops_per_token`.
        extra_forwards: frozen-model forwards over the same positions per step.
    """
    positions = positions_per_step * len(records)
    backprop = sum(r["kept_fraction"] * r["tokens"] if "kept_fraction" in r else r["tokens"] for r in records)
    flops = (1 + extra_forwards) * fwd * positions + bwd * backprop
    return {"steps": len(records), "positions": positions, "backprop_tokens": float(backprop), "flops": flops}


def drop_checkpoints(out_dir: Path) -> None:
    shutil.rmtree(Path(out_dir) / "checkpoints", ignore_errors=True)


def span_losses(model, sequences: list[np.ndarray], spans: list[tuple[list[int], list[int] | None]]) -> list[np.ndarray]:
    """For each ``(starts, stops)`` in ``spans``: per sequence, the summed loss and the count of its tokens
    ``start <= i < stop`` (``stops`` None: to the end), as [n, 2]; one forward pass for all spans.

    Token ``i``'s loss is ``-log p(x_i | x_<i)`` (``tokensift.models.scoring.token_losses``).
    """
    from tokensift.models.scoring import token_losses

    losses = token_losses(model, [list(map(int, s)) for s in sequences])
    out = []
    for starts, stops in spans:
        sums = np.zeros((len(sequences), 2))
        for r, (loss, start) in enumerate(zip(losses, starts, strict=True)):
            stop = len(sequences[r]) if stops is None else stops[r]
            part = loss[max(start, 1) - 1 : stop - 1]
            sums[r] = part.sum(), len(part)
        out.append(sums)
    return out
