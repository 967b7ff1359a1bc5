"""``TrainConfig``: what ``tokensift train CONFIG [key=value ...]`` reads (through ``tokensift.config.load``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from tokensift.config import ConfigError
from tokensift.trainers.losses import NORMALIZATIONS

OBJECTIVES = ("sft", "token_dpo")


@dataclass
class DataConfig:
    """The batches (see ``tokensift.pipeline.loader.TokenLoader``).

    Args:
        snapshot: snapshot directory (``<dir>/data/*.parquet`` with ``input_ids``, optional ``token_weights``).
        seq_len: tokens per sequence.
        micro_batch_size: sequences per micro-batch per data-parallel rank.
        num_workers: DataLoader workers packing batches (0: in the training process).
        shuffle: shuffle documents every epoch (seeded by ``seed``).
        mask_doc_boundary: weight 0 on the first token of each document.
        mask_prompt: SFT trains on response tokens only: the loss weights are multiplied by the batch's
            ``loss_mask`` (written by the tokenize stage from prompt/response or chat columns; a snapshot
            without it is all response).
    """

    snapshot: str = MISSING
    seq_len: int = field(default=256, metadata={"ge": 1})
    micro_batch_size: int = field(default=8, metadata={"ge": 1})
    num_workers: int = field(default=0, metadata={"ge": 0})
    shuffle: bool = True
    mask_doc_boundary: bool = True
    mask_prompt: bool = True


@dataclass
class ModelConfig:
    """The model trained.

    Args:
        kind: ``gpt`` (built-in ``tokensift.models.gpt.GPT``) or ``hf`` (a causal LM from a local path).
        gpt: ``GPTConfig`` fields, e.g. ``{vocab_size: 49152, n_layer: 4, moe: {num_experts: 4}}``.
        path: for ``hf``: a local model directory, or ``smollm2`` for the shipped SmolLM2-135M-Instruct.
        gguf_file: for ``hf``: a GGUF file inside ``path``.
    """

    kind: str = field(default="gpt", metadata={"choices": ("gpt", "hf")})
    gpt: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    gguf_file: str | None = None


@dataclass
class OptimConfig:
    """torch ``AdamW`` (a client optimizer: no DeepSpeed op is compiled) and a warmup + cosine schedule.

    Args:
        lr: peak learning rate.
        weight_decay: applied to matrices (``dim >= 2``), not to biases, norms and embeddings of rank 1.
        betas: Adam betas.
        eps: Adam epsilon.
        warmup_steps: linear warmup from 0.
        schedule: ``cosine`` (to ``min_lr_ratio * lr`` at ``max_steps``) or ``constant``.
        min_lr_ratio: final learning rate of the cosine schedule, relative to ``lr``.
        grad_clip: global gradient-norm clip (0: none).
    """

    lr: float = field(default=3e-4, metadata={"gt": 0.0})
    weight_decay: float = field(default=0.1, metadata={"ge": 0.0})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = field(default=1e-8, metadata={"gt": 0.0})
    warmup_steps: int = field(default=0, metadata={"ge": 0})
    schedule: str = field(default="cosine", metadata={"choices": ("cosine", "constant")})
    min_lr_ratio: float = field(default=0.1, metadata={"ge": 0.0, "le": 1.0})
    grad_clip: float = field(default=1.0, metadata={"ge": 0.0})


@dataclass
class ScorerConfig:
    """An online token scorer (``tokensift.scorers.online.get_online_scorer``) called every micro-batch.

    Args:
        name: ``eslm``, ``sstoken``, ``rft``... ; ``None``: the loader's weights are used as they are.
        params: the scorer's parameters.
    """

    name: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DPOConfig:
    """The token-level DPO objective (cDPO, ``tokensift.trainers.dpo``) over paired rows.

    Args:
        beta: DPO beta (cDPO: 0.1).
        form: ``sequence`` (the paper's token-weighted DPO: one sigmoid per pair over summed weighted
            log-ratios) or ``position`` (the release: chosen and rejected paired position by position).
        reference: the frozen reference model: ``initial`` (the trained model's own weights before the first
            update, as the release's PEFT base) or a local HF model directory.
    """

    beta: float = field(default=0.1, metadata={"gt": 0.0})
    form: str = field(default="sequence", metadata={"choices": ("sequence", "position")})
    reference: str = "initial"


@dataclass
class EngineConfig:
    """DeepSpeed.

    Args:
        zero_stage: ZeRO stage 0, 1 or 2.
        precision: ``fp32`` or ``bf16`` (fp16 is not offered: CPUs do not support it).
        accelerator: ``DS_ACCELERATOR`` when the environment does not set it (``cpu``, ``cuda``...);
            ``None`` lets DeepSpeed detect it.
        extra: more DeepSpeed config keys, merged over the generated ones.
    """

    zero_stage: int = field(default=0, metadata={"choices": (0, 1, 2)})
    precision: str = field(default="fp32", metadata={"choices": ("fp32", "bf16")})
    accelerator: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """A training run.

    Args:
        out_dir: where ``checkpoints/``, ``metrics.jsonl`` and ``config.yaml`` go.
        objective: ``sft`` (token-weighted LM loss over packed documents) or ``token_dpo`` (cDPO over the
            snapshot's preference pairs; see ``dpo``).
        max_steps: optimizer steps.
        grad_accum: micro-batches per optimizer step.
        loss_normalize: ``weights`` (sum(w*ce)/sum(w) per micro-batch), ``tokens`` (by the micro-batch's
            positions) or ``global`` (by the kept weight of the whole step over all ranks).
        log_every: steps between metric lines.
        save_every: steps between checkpoints (0: only at the end).
        resume: continue from ``out_dir/checkpoints`` when a checkpoint is there.
        progress: show a progress bar (rank 0).
    """

    name: str = "tokensift-train"
    seed: int = 0
    out_dir: str = MISSING
    objective: str = field(default="sft", metadata={"choices": OBJECTIVES})
    max_steps: int = field(default=100, metadata={"ge": 1})
    grad_accum: int = field(default=1, metadata={"ge": 1})
    loss_normalize: str = field(default="weights", metadata={"choices": NORMALIZATIONS})
    log_every: int = field(default=1, metadata={"ge": 1})
    save_every: int = field(default=0, metadata={"ge": 0})
    resume: bool = True
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    deepspeed: EngineConfig = field(default_factory=EngineConfig)


def check(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first value that cannot work."""
    checks = [
        (cfg.model.kind in ("gpt", "hf"), f"model.kind must be 'gpt' or 'hf', got {cfg.model.kind!r}"),
        (cfg.model.kind != "hf" or bool(cfg.model.path), "model.path is required when model.kind=hf"),
        (cfg.deepspeed.zero_stage in (0, 1, 2), f"deepspeed.zero_stage must be 0, 1 or 2, got {cfg.deepspeed.zero_stage}"),
        (cfg.deepspeed.precision in ("fp32", "bf16"),
         f"deepspeed.precision must be 'fp32' or 'bf16', got {cfg.deepspeed.precision!r}"),
        (cfg.loss_normalize in NORMALIZATIONS,
         f"loss_normalize must be one of {', '.join(NORMALIZATIONS)}, got {cfg.loss_normalize!r}"),
        (cfg.optim.schedule in ("cosine", "constant"), f"optim.schedule must be cosine or constant, got {cfg.optim.schedule!r}"),
        (cfg.max_steps >= 1 and cfg.grad_accum >= 1, "max_steps and grad_accum must be >= 1"),
        (cfg.data.seq_len >= 1 and cfg.data.micro_batch_size >= 1, "data.seq_len and data.micro_batch_size must be >= 1"),
        (cfg.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}"),
        (cfg.dpo.form in ("sequence", "position"), f"dpo.form must be 'sequence' or 'position', got {cfg.dpo.form!r}"),
        (cfg.dpo.beta > 0, f"dpo.beta must be > 0, got {cfg.dpo.beta}"),
        (cfg.objective != "token_dpo" or not cfg.scorer.name,
         "scorer.name is for objective=sft; token_dpo takes its token weights from the pairs' rejected_token_weights"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
