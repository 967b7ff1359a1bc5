"""Configuration of the built-in GPT (:mod:`tokensift.models.gpt`): size, and the optional mixture-of-experts
and mixture-of-depths settings, with their validation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from tokensift.models.mod import ROUTER_AUX
from tokensift.models.moe import BALANCE_MODES


@dataclass
class MoEConfig:
    """Mixture-of-experts MLPs.

    Args:
        num_experts: experts per MoE layer (N_E).
        top_k: experts per token.
        capacity_factor: slots per expert = ``ceil(factor * tokens * top_k / N_E)`` per training
            micro-batch (Switch: 1.25); ``None`` or 0 drops nothing. Eval forwards never drop.
        balance: ``micro`` (Megatron/DeepSpeed default), ``global`` (Qiu et al.; Qwen3) or ``aux_free``.
        aux_coef: weight of each layer's load-balancing loss (Megatron recommends starting at 1e-2).
        bias_update_rate: aux-loss-free bias step gamma (DeepSeek-V3: 1e-3).
        every: MoE MLP in every ``every``-th block (1: all blocks, 2: every other, Switch style).
    """

    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float | None = 1.25
    balance: str = "global"
    aux_coef: float = 0.01
    bias_update_rate: float = 1e-3
    every: int = 1


@dataclass
class MoDConfig:
    """Mixture-of-depths routing.

    Args:
        capacity: share of each sequence's tokens a routed block processes (paper: 0.125).
        every: route every ``every``-th block (paper: every other block, the first block stays dense).
        router_aux: causal routing for sampling: ``predictor`` (stop-gradient MLP) or ``bce`` (router BCE).
        aux_coef: weight of the router BCE when ``router_aux="bce"`` (the predictor's loss cannot reach the
            language model, so it is added with weight 1).
    """

    capacity: float = 0.125
    every: int = 2
    router_aux: str = "predictor"
    aux_coef: float = 0.01


@dataclass
class GPTConfig:
    """A GPT. Defaults are GPT-2 small (nanoGPT); ``moe`` / ``mod`` ``None`` give a dense model."""

    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    moe: MoEConfig | None = None
    mod: MoDConfig | None = None

    @classmethod
    def from_dict(cls, values: Mapping) -> GPTConfig:
        """Build from a mapping (dict or omegaconf ``DictConfig``); unknown keys raise naming the key."""
        values = dict(values)
        for key, sub in (("moe", MoEConfig), ("mod", MoDConfig)):
            if isinstance(values.get(key), Mapping):
                unknown = set(values[key]) - {f.name for f in fields(sub)}
                if unknown:
                    raise ValueError(f"GPTConfig.{key}: unknown key(s) {sorted(unknown)}")
                values[key] = sub(**values[key])
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"GPTConfig: unknown key(s) {sorted(unknown)}")
        return cls(**values)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent key."""
        checks = [
            (self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}"),
            (self.vocab_size > 0 and self.block_size > 0 and self.n_layer > 0, "vocab_size, block_size, n_layer must be > 0"),
            (0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)"),
        ]
        if self.moe is not None:
            m = self.moe
            checks += [
                (1 <= m.top_k <= m.num_experts, f"moe.top_k={m.top_k} must be in [1, moe.num_experts={m.num_experts}]"),
                (m.balance in BALANCE_MODES, f"moe.balance={m.balance!r} must be one of {BALANCE_MODES}"),
                (m.every >= 1, f"moe.every={m.every} must be >= 1"),
            ]
        if self.mod is not None:
            d = self.mod
            checks += [
                (0.0 < d.capacity <= 1.0, f"mod.capacity={d.capacity} must be in (0, 1]"),
                (d.router_aux in ROUTER_AUX, f"mod.router_aux={d.router_aux!r} must be one of {ROUTER_AUX}"),
                (d.every >= 1, f"mod.every={d.every} must be >= 1"),
            ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"GPTConfig: {message}")
