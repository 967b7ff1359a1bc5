"""The DeepSpeed training loop behind ``tokensift train``.

``objective: sft`` (default). Per optimizer step: ``model.begin_global_batch()``; ``grad_accum`` micro-batches
from the :class:`~tokensift.pipeline.loader.TokenLoader` (sharded by data-parallel rank), each one forward ->
online token scorer (optional) -> weighted loss + ``model.aux_loss()`` -> ``engine.backward`` ->
``engine.step()`` (DeepSpeed applies the optimizer at the accumulation boundary); then
``model.end_global_batch()``, ``scorer.on_step_end(model)``, a metrics line, and a checkpoint every
``save_every`` steps and at the end. With ``data.mask_prompt`` (default) the loss weights are multiplied by
the batch's ``loss_mask``, so prompts are not trained.

``objective: token_dpo``: the micro-batches are preference pairs (:class:`~tokensift.trainers.pairs.PairLoader`)
and the loss is cDPO's token-level DPO against a frozen reference (:mod:`tokensift.trainers.dpo`).

A run whose ``out_dir`` holds a checkpoint resumes from it: model, optimizer, LR schedule, loader position,
the online scorer's ``state_dict()`` (plain tensors and numbers, in the checkpoint's client state) and step.

The world comes from the launcher's environment (``torchrun``, the ``deepspeed`` launcher, Slurm ...): a
process started alone gets ``RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1`` and a free
``MASTER_PORT``. The device is DeepSpeed's accelerator (``deepspeed.accelerator``; CPU + gloo here, CUDA +
NCCL on GPUs).
"""

from __future__ import annotations

import copy
import math
import os
import socket
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from tokensift.config import to_yaml
from tokensift.pipeline.loader import TokenLoader
from tokensift.trainers import checkpoint
from tokensift.trainers.config import TrainConfig, check
from tokensift.trainers.losses import global_denominator
from tokensift.trainers.metrics import MetricsWriter, all_reduce_sums
from tokensift.trainers.step import micro_batch_loss, scored_weights


def distributed_env_defaults() -> None:
    """Fill in a one-process world when no launcher set one (DeepSpeed otherwise tries MPI discovery)."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)


def build_model(cfg: TrainConfig) -> nn.Module:
    """The built-in GPT (``model.gpt``) or an HF causal LM from ``model.path``, in training mode."""
    if cfg.model.kind == "gpt":
        from tokensift.models.gpt import GPT
        from tokensift.models.gpt_config import GPTConfig

        try:
            gpt_cfg = GPTConfig.from_dict(OmegaConf.to_container(OmegaConf.create(dict(cfg.model.gpt))))
            if cfg.data.seq_len > gpt_cfg.block_size:
                raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds model.gpt.block_size={gpt_cfg.block_size}")
            return GPT(gpt_cfg).train()
        except (TypeError, ValueError) as e:
            from tokensift.config import ConfigError

            raise ConfigError(f"model.gpt: {e}") from None
    from tokensift.models.causal_lm import load_model

    return load_model(cfg.model.path, gguf_file=cfg.model.gguf_file).train()


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """torch AdamW; weight decay on parameters with ``dim >= 2`` only (nanoGPT's grouping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``optim.lr`` at optimizer step ``step``: linear warmup, then cosine or constant."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.max_steps - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed JSON config: ZeRO stage, precision, batch sizes, clipping (+ ``deepspeed.extra``)."""
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.deepspeed.precision == "bf16"},
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }
    ds.update(OmegaConf.to_container(OmegaConf.create(dict(cfg.deepspeed.extra))))
    return ds


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns the last metrics record (all ranks)."""
    check(cfg)
    if cfg.deepspeed.accelerator:
        os.environ.setdefault("DS_ACCELERATOR", cfg.deepspeed.accelerator)
    distributed_env_defaults()
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, cfg), config=deepspeed_config(cfg),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg)),
    )
    module, rank, world = engine.module, dist.get_rank(), dist.get_world_size()
    if engine.dp_world_size != world:
        raise RuntimeError(f"only data parallelism is supported: dp world {engine.dp_world_size} != world {world}")
    scorer = None
    if cfg.scorer.name:
        from tokensift.scorers.online import get_online_scorer

        scorer = get_online_scorer(cfg.scorer.name, OmegaConf.to_container(OmegaConf.create(dict(cfg.scorer.params))))
    reference = _reference(cfg, module, engine.device) if cfg.objective == "token_dpo" else None
    loader = _loader(cfg, rank, world, engine.device)
    out = Path(cfg.out_dir)
    ckpt_dir = out / "checkpoints"
    start = 0
    state = checkpoint.load(engine, ckpt_dir) if cfg.resume else None
    if state is not None:
        start = int(state["step"])
        loader.load_state_dict(state["loader"])
        if scorer is not None and state.get("scorer") is not None:
            scorer.load_state_dict(state["scorer"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
    writer = MetricsWriter(out / "metrics.jsonl", enabled=rank == 0)
    bar = _progress(cfg, start, rank)
    batches, record = iter(loader), {}
    vocab = getattr(getattr(module, "config", None), "vocab_size", None)
    for step in range(start, cfg.max_steps):
        if reference is not None:
            record = _dpo_step(engine, reference, batches, cfg, vocab, step)
        else:
            record = _train_step(engine, module, scorer, batches, cfg, vocab, step)
        if rank == 0:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", kept=f"{record.get('kept_fraction', 1.0):.2f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            writer.write(record)
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.max_steps:
            scorer_state = scorer.state_dict() if scorer is not None else None
            checkpoint.save(engine, ckpt_dir, step + 1, {"loader": loader.state_dict(), "scorer": scorer_state})
    bar.close()
    return record


def _loader(cfg: TrainConfig, rank: int, world: int, device: torch.device):
    """The packed-document loader (``sft``) or the preference-pair loader (``token_dpo``)."""
    if cfg.objective == "token_dpo":
        from tokensift.trainers.pairs import PairLoader

        return PairLoader(cfg.data.snapshot, cfg.data.seq_len, cfg.data.micro_batch_size, rank=rank,
                          world_size=world, seed=cfg.seed, shuffle=cfg.data.shuffle)
    return TokenLoader(
        cfg.data.snapshot, cfg.data.seq_len, cfg.data.micro_batch_size, rank=rank, world_size=world, seed=cfg.seed,
        shuffle=cfg.data.shuffle, mask_doc_boundary=cfg.data.mask_doc_boundary, num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )


def _reference(cfg: TrainConfig, module: nn.Module, device: torch.device) -> nn.Module:
    """cDPO's frozen reference: a copy of the model before any update (taken before a resume loads weights),
    or an HF causal LM from ``dpo.reference``."""
    if cfg.dpo.reference == "initial":
        ref = copy.deepcopy(module)
    else:
        from tokensift.models.causal_lm import load_model

        ref = load_model(cfg.dpo.reference).to(device=device, dtype=next(module.parameters()).dtype)
    return ref.eval().requires_grad_(False)


def _dpo_step(engine, reference, batches, cfg: TrainConfig, vocab: int | None, step: int) -> dict:
    """One optimizer step of token-level DPO over ``grad_accum`` micro-batches of pairs (summed over ranks)."""
    from tokensift.trainers.dpo import dpo_micro_batch_loss

    t0, lr = time.perf_counter(), float(engine.get_lr()[0])
    sums = torch.zeros(5, dtype=torch.float64)
    for _ in range(cfg.grad_accum):
        mb = _to_device(_next(batches, cfg), engine.device, vocab, ("chosen_input_ids", "rejected_input_ids"))
        loss, stats = dpo_micro_batch_loss(engine, reference, mb, cfg.dpo.beta, cfg.dpo.form, engine.module)
        engine.backward(loss)
        engine.step()
        tokens = int(mb["chosen_mask"].sum() + mb["rejected_mask"].sum())
        sums += torch.tensor([loss.item(), stats["margin"], stats["accuracy"], stats["pairs"], tokens], dtype=torch.float64)
    loss_sum, margin, accuracy, pairs, tokens = all_reduce_sums(sums.tolist(), engine.device)
    seconds = time.perf_counter() - t0
    world = torch.distributed.get_world_size()
    record = {
        "step": step + 1, "loss": loss_sum / (cfg.grad_accum * world), "lr": lr, "dpo/margin": margin / pairs,
        "dpo/reward_accuracy": accuracy / pairs, "tokens": int(tokens), "tokens_per_s": tokens / seconds,
        "step_time_s": seconds,
    }
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    return record


def _progress(cfg: TrainConfig, start: int, rank: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=start, desc=cfg.name, disable=rank != 0 or not cfg.progress)


def _train_step(engine, module, scorer, batches, cfg: TrainConfig, vocab: int | None, step: int) -> dict:
    """One optimizer step over ``grad_accum`` micro-batches; returns its metrics (summed over ranks)."""
    t0, lr = time.perf_counter(), float(engine.get_lr()[0])
    if hasattr(module, "begin_global_batch"):
        module.begin_global_batch()
    micro = [_to_device(_next(batches, cfg), engine.device, vocab) for _ in range(cfg.grad_accum)]
    if cfg.data.mask_prompt:
        for mb in micro:
            if "loss_mask" in mb:
                mb["loss_weights"] = mb["loss_weights"] * mb["loss_mask"].to(mb["loss_weights"].dtype)
    denominator, online = None, scorer
    if cfg.loss_normalize == "global":
        if scorer is not None:  # the kept count must be known before any backward: score without gradient first
            for mb in micro:
                mb["loss_weights"] = scored_weights(engine, module, mb, scorer)
            online = None
        denominator = global_denominator([mb["loss_weights"].sum() for mb in micro], cfg.grad_accum)
    sums = torch.zeros(5, dtype=torch.float64)
    for mb in micro:
        loss, token_loss, weights = micro_batch_loss(engine, module, mb, online, cfg.loss_normalize, denominator)
        aux = module.aux_loss() if hasattr(module, "aux_loss") else loss.new_zeros(())
        engine.backward(loss + aux.to(loss.dtype))
        engine.step()
        sums += torch.tensor([(token_loss * weights).sum().item(), weights.sum().item(),
                              (weights != 0).sum().item(), weights.numel(), aux.item()], dtype=torch.float64)
    if hasattr(module, "end_global_batch"):
        module.end_global_batch()
    if scorer is not None and hasattr(scorer, "on_step_end"):
        scorer.on_step_end(module)
    wce, wsum, kept, positions, aux = all_reduce_sums(sums.tolist(), engine.device)
    seconds = time.perf_counter() - t0
    world = torch.distributed.get_world_size()
    record = {
        "step": step + 1, "loss": wce / max(wsum, 1e-12), "aux_loss": aux / (cfg.grad_accum * world),
        "lr": lr, "kept_fraction": kept / positions, "tokens": int(positions),
        "tokens_per_s": positions / seconds, "step_time_s": seconds,
    }
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    if hasattr(module, "stats"):
        record.update({f"model/{k}": v for k, v in module.stats().items()})
    if scorer is not None and hasattr(scorer, "stats"):
        record.update({f"scorer/{k}": v for k, v in scorer.stats().items()})
    return record


def _next(batches, cfg: TrainConfig) -> dict:
    try:
        return next(batches)
    except StopIteration:
        raise RuntimeError(f"{cfg.data.snapshot}: the loader ran out of data before max_steps={cfg.max_steps}") from None


def _to_device(batch: dict, device: torch.device, vocab: int | None, id_keys=("input_ids", "labels")) -> dict:
    top = max(int(batch[k].max()) for k in id_keys)
    if vocab is not None and top >= vocab:
        raise ValueError(f"data.snapshot holds token id {top}, not below the model's vocab_size {vocab}")
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
