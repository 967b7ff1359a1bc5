"""The built-in GPT family, readable top to bottom (nanoGPT style): dense, mixture-of-experts, mixture-of-depths.

- Dense: pre-LayerNorm blocks ``x + attn(ln(x))``, ``x + mlp(ln(x))``; learned absolute positions; tied
  input embedding and ``lm_head`` (GPT-2 / nanoGPT).
- MoE (``GPTConfig.moe``): the MLP of every ``moe.every``-th block becomes ``num_experts`` MLP experts
  behind a softmax router with top-k routing and per-expert capacity; the load-balancing loss
  ``N_E * sum_i f_i p_i`` is computed per micro-batch or over the global batch, or replaced by aux-loss-free
  bias balancing (:mod:`tokensift.models.moe`).
- MoD (``GPTConfig.mod``): every ``mod.every``-th block (every other one by default) only processes the
  top 12.5 % of each sequence's tokens by a learned router, ``x_i + r_i * f(X~)_i``; the others skip it
  (:mod:`tokensift.models.mod`). Training routes by top-k; ``model.eval()`` routes causally (router BCE
  or auxiliary predictor), as sampling must.

Packed rows: ``position_ids`` and ``document_ids`` (``[B, T]``, from ``tokensift.pipeline.loader``) give each
token its position inside its document and confine attention to the token's own document (a block-diagonal
causal mask, :func:`tokensift.models.packing.document_mask`); without them attention is plainly causal.
``output_attentions=True`` also returns the last layer's attention probabilities ``[B, H, T, T]``.

Training loop contract: ``loss = lm_loss + model.aux_loss()`` per micro-batch; ``model.begin_global_batch()``
before the first micro-batch of each optimizer step and ``model.end_global_batch()`` after the step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tokensift.models.gpt_config import GPTConfig
from tokensift.models.mod import (
    RoutePredictor,
    mod_capacity,
    positions_mask,
    routed_attention_mask,
    routing_agreement,
    routing_bce,
    top_k_positions,
)
from tokensift.models.moe import (
    ExpertLoad,
    balance_loss,
    capacity_mask,
    combine_weights,
    expert_capacity,
    expert_counts,
    route_top_k,
)
from tokensift.models.packing import document_mask


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; an explicit boolean ``attn_mask`` (True = attend) replaces the causal
    mask. Returns ``(y, probs)``: ``probs`` ``[B, H, T, T]`` only when ``need_weights`` (computed in the open
    instead of by the fused kernel), else ``None``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        dropout, probs = self.dropout if self.training else 0.0, None
        if need_weights:
            allowed = attn_mask if attn_mask is not None else torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
            probs = F.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            y = F.dropout(probs, dropout, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=attn_mask is None)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C))), probs


class MLP(nn.Module):
    """``C -> 4C -> GELU -> C``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class MoE(nn.Module):
    """Top-k mixture of MLP experts with capacity; keeps its balancing loss of the last forward in ``aux``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg.moe
        self.router = nn.Linear(cfg.n_embd, self.cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(self.cfg.num_experts))
        self.load = ExpertLoad(self.cfg.num_experts)
        self.aux: torch.Tensor | None = None
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, (B, T, C) = self.cfg, x.shape
        h = x.reshape(B * T, C)
        probs = F.softmax(self.router(h).float(), dim=-1)  # before capacity dropping
        bias = self.load.expert_bias if m.balance == "aux_free" else None
        gates, index = route_top_k(probs, m.top_k, bias)
        capacity = expert_capacity(B * T, m.num_experts, m.top_k, m.capacity_factor) if self.training else None
        keep = capacity_mask(index, m.num_experts, capacity)  # eval is dropless, so sampling stays causal
        self.last = {"expert_index": index.detach(), "dropped": 1.0 - keep.float().mean().detach()}
        self.aux = self._balancing_loss(probs, index) if self.training and torch.is_grad_enabled() else None
        gates = combine_weights(gates, keep).to(h.dtype)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero((index == e) & keep, as_tuple=True)
            if token.numel():
                out.index_add_(0, token, gates[token, slot, None] * expert(h[token]))
        return out.view(B, T, C)

    def _balancing_loss(self, probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        """Count this micro-batch's assignments and return ``aux_coef * LBL`` (``None`` for aux_free)."""
        m = self.cfg
        counts = expert_counts(index, m.num_experts)
        self.load.add(counts, sync=m.balance == "global")
        micro = balance_loss(probs, counts.float() / counts.sum())
        self.last["lbl_micro"] = micro.detach()
        if m.balance == "aux_free":
            return None
        return m.aux_coef * (micro if m.balance == "micro" else balance_loss(probs, self.load.fraction()))


class Block(nn.Module):
    """Pre-LN transformer block; the MLP is a :class:`MoE` when ``moe``."""

    def __init__(self, cfg: GPTConfig, moe: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MoE(cfg) if moe else MLP(cfg)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(output, attention probabilities or None)``."""
        a, probs = self.attn(self.ln_1(x), attn_mask, need_weights)
        x = x + a
        return x + self.mlp(self.ln_2(x)), probs


class MoDBlock(nn.Module):
    """Mixture-of-depths around a :class:`Block`: ``x_i + r_i * (Block(X~) - X~)_i`` on the routed tokens.

    Returns ``(output, probs)``; ``probs`` (with ``need_weights``) is ``[B, H, T, T]``, zero on the rows and
    columns of tokens that skipped the block."""

    def __init__(self, cfg: GPTConfig, block: Block):
        super().__init__()
        self.block, self.cfg = block, cfg.mod
        self.router = nn.Linear(cfg.n_embd, 1, bias=False)
        self.predictor = RoutePredictor(cfg.n_embd) if self.cfg.router_aux == "predictor" else None
        self.aux: torch.Tensor | None = None
        self.last: dict[str, torch.Tensor] = {}

    def forward(
        self, x: torch.Tensor, document_ids: torch.Tensor | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        r = self.router(x).squeeze(-1)
        causal_logits = r if self.predictor is None else self.predictor(x)
        if not self.training:  # sampling-time routing: each token decides from its own prefix
            routed = causal_logits > 0
            self.aux, self.last = None, {"routed": routed.detach()}
            mask = routed_attention_mask(routed)
            if document_ids is not None:
                mask = mask & document_mask(document_ids)[:, None]
            out, probs = self.block(x, mask, need_weights)
            delta = out - x
            return x + torch.where(routed[..., None], r[..., None] * delta, torch.zeros_like(delta)), probs
        positions = top_k_positions(r, mod_capacity(T, self.cfg.capacity))
        target = positions_mask(positions, T)
        self.last = {"routed": target, "causal": causal_logits.detach() > 0}
        coef = self.cfg.aux_coef if self.predictor is None else 1.0
        self.aux = coef * routing_bce(causal_logits, target) if torch.is_grad_enabled() else None
        index = positions[..., None].expand(-1, -1, C)
        routed_x = x.gather(1, index)
        mask = None if document_ids is None else document_mask(document_ids.gather(1, positions))[:, None]
        out, probs = self.block(routed_x, mask, need_weights)
        delta = out - routed_x
        if probs is not None:  # back to full-sequence rows and columns
            H, k = probs.shape[1], positions.shape[1]
            rows = probs.new_zeros(B, H, T, k).scatter_(2, positions[:, None, :, None].expand(B, H, k, k), probs)
            probs = probs.new_zeros(B, H, T, T).scatter_(3, positions[:, None, None, :].expand(B, H, T, k), rows)
        return x.scatter_add(1, index, r.gather(1, positions)[..., None].to(delta.dtype) * delta), probs


class GPT(nn.Module):
    """Token + position embeddings -> blocks (dense / MoE / MoD) -> final LayerNorm -> tied ``lm_head``."""

    def __init__(self, cfg: GPTConfig | Mapping):
        super().__init__()
        cfg = cfg if isinstance(cfg, GPTConfig) else GPTConfig.from_dict(cfg)
        cfg.validate()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        blocks: list[nn.Module] = []
        for i in range(cfg.n_layer):
            block = Block(cfg, moe=cfg.moe is not None and i % cfg.moe.every == cfg.moe.every - 1)
            routed = cfg.mod is not None and i % cfg.mod.every == cfg.mod.every - 1
            blocks.append(MoDBlock(cfg, block) if routed else block)
        self.h = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2 scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None, return_hidden: bool = False, output_attentions: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, T, V]``, or the final normed hidden states ``[B, T, C]`` when ``return_hidden``.

        Args:
            input_ids: ``[B, T]`` token ids.
            position_ids: ``[B, T]`` position of each token in its document (default ``0..T-1``).
            document_ids: ``[B, T]`` document index of each token: attention stays inside a document.
            return_hidden: return the final hidden states instead of logits.
            output_attentions: return ``(logits or hidden, last layer's attention probabilities [B, H, T, T])``.
        """
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise ValueError(f"input_ids has {T} positions, more than block_size={self.config.block_size}")
        positions = torch.arange(T, device=input_ids.device) if position_ids is None else position_ids
        x = self.drop(self.wte(input_ids) + self.wpe(positions))
        mask = None if document_ids is None else document_mask(document_ids)[:, None]
        probs = None
        for i, block in enumerate(self.h):
            need = output_attentions and i == len(self.h) - 1
            x, probs = block(x, document_ids, need) if isinstance(block, MoDBlock) else block(x, mask, need)
        x = self.ln_f(x)
        out = x if return_hidden else self.lm_head(x)
        return (out, probs) if output_attentions else out

    def routed_modules(self, kind: type) -> list[tuple[int, nn.Module]]:
        """``(block index, module)`` for every MoE layer or MoD block."""
        found = []
        for i, block in enumerate(self.h):
            inner = block.block if isinstance(block, MoDBlock) else block
            module = block if kind is MoDBlock else inner.mlp
            if isinstance(module, kind):
                found.append((i, module))
        return found

    def aux_loss(self) -> torch.Tensor:
        """Sum of the auxiliary losses of the last training forward (MoE balancing, MoD routing); 0 if none."""
        losses = [m.aux for _, m in self.routed_modules(MoE) + self.routed_modules(MoDBlock) if m.aux is not None]
        return torch.stack(losses).sum() if losses else self.lm_head.weight.new_zeros(())

    def begin_global_batch(self) -> None:
        """Reset the global-batch expert counts; call before the first micro-batch of each optimizer step."""
        for _, moe in self.routed_modules(MoE):
            moe.load.reset()

    @torch.no_grad()
    def end_global_batch(self) -> None:
        """After the optimizer step: all-reduce the step's expert counts and apply the aux-loss-free update."""
        for _, moe in self.routed_modules(MoE):
            moe.load.sync()
            if moe.cfg.balance == "aux_free":
                moe.load.update_bias(moe.cfg.bias_update_rate)

    def stats(self) -> dict[str, float]:
        """Routing metrics: per MoE layer the load share of each expert over the global batch so far,
        max/mean load, dropped share and micro-batch LBL; per MoD block the routed share and, in training,
        how well causal routing agrees with top-k."""
        out: dict[str, float] = {}
        for i, moe in self.routed_modules(MoE):
            load = moe.load.fraction()
            out[f"moe/{i}/max_over_mean_load"] = (load.max() * load.numel()).item()
            out.update({f"moe/{i}/load_{e}": v for e, v in enumerate(load.tolist())})
            out.update({f"moe/{i}/{k}": v.item() for k, v in moe.last.items() if k != "expert_index"})
        for i, mod in self.routed_modules(MoDBlock):
            if "routed" in mod.last:
                out[f"mod/{i}/routed_share"] = mod.last["routed"].float().mean().item()
            if "causal" in mod.last:
                agree = routing_agreement(mod.last["causal"], mod.last["routed"])
                out.update({f"mod/{i}/causal_{k}": v for k, v in agree.items()})
        return out

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Forward FLOPs per token (2 per multiply-add; training is about 3x) at ``seq_len`` (block_size).

        Per block ``24 C^2`` (qkv, output projection, 4x MLP) plus ``4 T C`` attention (QK^T and AV over the
        full context, as in nanoGPT / Chinchilla). An MoE MLP costs ``top_k`` experts plus a ``2 C N_E``
        router; a MoD block runs on ``k = C_mod T`` tokens with a ``k``-token context, plus its router (and
        predictor) on every token. The tied ``lm_head`` adds ``2 C V``.
        """
        cfg, T = self.config, seq_len or self.config.block_size
        C = cfg.n_embd

        def block_flops(block: Block, context: int) -> float:
            mlp = 16 * C * C
            if isinstance(block.mlp, MoE):
                mlp = block.mlp.cfg.top_k * mlp + 2 * C * block.mlp.cfg.num_experts
            return 8 * C * C + 4 * context * C + mlp

        total = 2 * C * cfg.vocab_size
        for block in self.h:
            if isinstance(block, MoDBlock):
                k = mod_capacity(T, block.cfg.capacity)
                predictor = block.predictor.flops_per_token() if block.predictor is not None else 0
                total += k / T * block_flops(block.block, k) + 2 * C + predictor
            else:
                total += block_flops(block, T)
        return float(total)
