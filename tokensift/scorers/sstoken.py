"""ssToken: self-modulated and semantic-aware token selection (Qin et al., arXiv 2510.18250, ICLR 2026).

For one sample with prompt length p and response positions R = {p, ..., T-1} (index i = token i):

    REL_i   = l_hist(i) - l_cur(i)                         (history-model loss minus current loss)
    REL~_i  = (REL_i - min_R REL) / (max_R REL - min_R REL + 1e-8)
    A_i     = sum_{j < p} attn_last[i, j]                  (last layer, mean over heads, row of token i)
    score_i = gamma * REL~_i + (1 - gamma) * A_i

and the top ``ceil(rho * |R|)`` response positions are kept (weight 1), the rest and the prompt get 0;
the loss is the CE mean over kept tokens. Defaults rho = 0.6, gamma = 0.5 (the official code's CLI). The
history model is the base model (the release: a fixed pre-SFT model) or, online, an EMA of the trained
weights ``theta_hist <- d*theta_hist + (1-d)*theta`` after each optimizer step. The release also uses
attention only (gamma_eff = 0) for its first 10k samples, since REL is ~0 while current = base; here that is
``rel_warmup_steps``. Checked against the official ``filter_tokens_with_attention_loss`` semantics.

The attention of the last decoder layer is captured during the normal forward by a wrapper attention
function (HF transformers models): the layer still runs its fast kernel and the head-averaged probabilities
are recomputed for that one layer only, as the release's hook variant does.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from tokensift.pipeline import schema
from tokensift.pipeline.registry import register
from tokensift.scorers import common

_CAPTURE = "tokensift_capture"


def sstoken_keep(
    cur_loss: torch.Tensor, hist_loss: torch.Tensor | None, attn_to_prompt: torch.Tensor | None, rho: float, gamma: float
) -> torch.Tensor:
    """Keep mask over one sample's response positions (1-D tensors of equal length, response only)."""
    n = cur_loss.numel()
    score = torch.zeros(n, dtype=torch.float32, device=cur_loss.device)
    if gamma > 0:
        rel = (hist_loss - cur_loss).float()
        score += gamma * (rel - rel.min()) / (rel.max() - rel.min() + 1e-8)
    if gamma < 1:
        score += (1 - gamma) * attn_to_prompt.float()
    keep = torch.zeros(n, dtype=torch.bool, device=cur_loss.device)
    if n:
        keep[torch.topk(score, math.ceil(rho * n)).indices] = True
    return keep


def capture_last_attention(model) -> torch.nn.Module:
    """Make the last decoder layer's attention record its head-averaged probabilities on every forward.

    Returns the attention module; after a forward, ``module.tokensift_attn`` is [B, T, T] (fp32, no grad).
    Works for HF transformers models that dispatch attention through ``AttentionInterface``.
    """
    from transformers import AttentionInterface

    inner = getattr(model, "get_decoder", lambda: None)()
    attn = getattr(getattr(inner, "layers", [None])[-1], "self_attn", None)
    if attn is None or not hasattr(attn, "config"):
        raise ValueError(
            f"sstoken: cannot reach the last attention layer of {type(model).__name__}; "
            "attention importance needs an HF transformers decoder (use gamma: 1 for other models)"
        )
    if getattr(attn.config, "_attn_implementation", None) == _CAPTURE:
        return attn
    AttentionInterface.register(_CAPTURE, _capturing_attention)
    original = attn.config._attn_implementation
    attn.tokensift_inner = original if original in AttentionInterface._global_mapping else "sdpa"
    attn.config = copy.copy(attn.config)
    attn.config._attn_implementation = _CAPTURE
    attn.tokensift_attn = None
    return attn


def _capturing_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    from transformers import AttentionInterface

    out = AttentionInterface._global_mapping[module.tokensift_inner](
        module, query, key, value, attention_mask, scaling=scaling, **kwargs
    )
    with torch.no_grad():
        k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        s = (query.float() @ k.float().transpose(2, 3)) * (scaling or query.shape[-1] ** -0.5)
        t, kv = s.shape[-2:]
        if attention_mask is None:
            allowed = torch.ones(t, kv, dtype=torch.bool, device=s.device).tril(kv - t)
            s = s.masked_fill(~allowed, float("-inf"))
        elif attention_mask.dtype == torch.bool:
            s = s.masked_fill(~attention_mask[..., :kv], float("-inf"))
        else:
            s = s + attention_mask[..., :kv].float()
        module.tokensift_attn = torch.nan_to_num(s.softmax(-1)).mean(1)
    return out


def _logits(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask) if mask is not None else model(ids)
    return out.logits if hasattr(out, "logits") else out


@dataclass
class SSTokenStageParams(common.LMParams):
    """Args (plus ``LMParams``; ``model`` is the current model):
    history_model: the history (base) model; same tokenizer as ``model``.
    history_gguf_file: a GGUF file inside ``history_model``.
    rho: share of each response kept (top ``ceil(rho * len)``).
    gamma: weight of the normalised loss reduction; ``1 - gamma`` weighs the attention to the prompt.
    """

    history_model: str = common.SMOLLM2
    history_gguf_file: str | None = None
    rho: float = 0.6
    gamma: float = 0.5


def _check(rho: float, gamma: float) -> None:
    if not 0 < rho <= 1 or not 0 <= gamma <= 1:
        raise ValueError(f"sstoken: need 0 < rho <= 1 and 0 <= gamma <= 1, got rho={rho}, gamma={gamma}")


@register("sstoken", kind="map", params=SSTokenStageParams)
class SSTokenStage:
    """Offline ssToken: the current ``model`` vs the ``history_model`` (base), one prompt + response per row."""

    def __init__(self, params: SSTokenStageParams):
        _check(params.rho, params.gamma)
        self.p = params
        self.model, _ = common.load_lm(params)
        self.history = None
        if params.gamma > 0:
            self.history, _ = common.load_lm(params, params.history_model, params.history_gguf_file)
        self.attn = capture_last_attention(self.model) if params.gamma < 1 else None

    @classmethod
    def needs(cls, p: SSTokenStageParams) -> list[str]:
        return [schema.INPUT_IDS, schema.PROMPT_LENGTH]

    @classmethod
    def adds(cls, p: SSTokenStageParams) -> list[str]:
        return [schema.TOKEN_WEIGHTS]

    @torch.no_grad()
    def __call__(self, batch):
        seqs, plens = common.read_sequences(batch, "sstoken")
        out = [np.zeros(len(s), np.float32) for s in seqs]
        for lo, hi in common.chunks(len(seqs), self.p.batch_size):
            part = [s[: self.p.max_length] for s in seqs[lo:hi]]
            ids, mask = common.pad(part, self.p.device)
            cur = common.aligned_losses(_logits(self.model, ids, mask), ids)
            hist = common.aligned_losses(_logits(self.history, ids, mask), ids) if self.history else None
            for r, s in enumerate(part):
                p = int(plens[lo + r])
                if p >= len(s):
                    continue
                start = max(p, 1)
                a = self.attn.tokensift_attn[r, start : len(s), :p].sum(-1) if self.attn else None
                h = hist[r, start : len(s)] if hist is not None else None
                keep = sstoken_keep(cur[r, start : len(s)], h, a, self.p.rho, self.p.gamma)
                out[lo + r][start : len(s)] = keep.cpu().numpy()
        return common.with_token_weights(batch, out)


@dataclass
class SSTokenParams:
    """Args:
    rho: share of each sample's response tokens kept.
    gamma: weight of the normalised loss reduction (``1 - gamma``: attention to the prompt).
    history: ``base`` (frozen copy of the model at the first step) or ``ema``.
    ema_decay: ``d`` of the EMA history.
    rel_warmup_steps: optimizer steps using attention only (gamma_eff = 0), as the release's warm-up.
    """

    rho: float = 0.6
    gamma: float = 0.5
    history: str = "base"
    ema_decay: float = 0.99
    rel_warmup_steps: int = 0


class SSTokenScorer:
    """Online ssToken over the loader's packed rows.

    A *sample* is a run of a row's labels made of zero-weight labels (its prompt) then positive-weight labels
    (its response); it ends where a zero weight follows a positive one. Label ``t`` is token ``t+1`` of the
    row, so its attention row is ``t+1`` as in the release (the last label of a row, whose token lies
    outside the window, uses row ``T-1``); its prompt columns are the input positions whose token is a
    zero-weight label of the same sample. Returns ``weights * keep``.
    """

    Params = SSTokenParams

    def __init__(self, params: SSTokenParams):
        _check(params.rho, params.gamma)
        if params.history not in ("base", "ema") or not 0 <= params.ema_decay <= 1:
            raise ValueError("sstoken: history must be 'base' or 'ema' and 0 <= ema_decay <= 1")
        self.p = params
        self.history = None
        self.attn = None
        self.steps = 0
        self._kept = self._valid = 0

    def __call__(self, token_loss, logits, weights, batch, model) -> torch.Tensor:
        net = getattr(model, "module", model)
        gamma = self.p.gamma if self.steps >= self.p.rel_warmup_steps else 0.0
        ids, labels = batch["input_ids"], batch["labels"]
        hist = None
        if gamma > 0:
            if self.history is None:
                self.history = copy.deepcopy(net).eval().requires_grad_(False)
            with torch.no_grad():
                hl = _logits(self.history, ids)
                hist = torch.nn.functional.cross_entropy(hl.float().transpose(1, 2), labels, reduction="none")
        attn = self._attention(net, ids) if gamma < 1 else None
        keep = torch.zeros_like(weights, dtype=torch.bool)
        pos = weights > 0
        T = ids.shape[1]
        rows = torch.clamp(torch.arange(T, device=ids.device) + 1, max=T - 1)
        for b in range(ids.shape[0]):
            seg = torch.cumsum((~pos[b]) & torch.roll(pos[b], 1) & (torch.arange(T, device=ids.device) > 0), 0)
            seg_in = torch.cat([seg[:1], seg[:-1]])
            prompt_in = torch.cat([(~pos[b])[:1], ~pos[b][:-1]])
            for s in torch.unique(seg[pos[b]]):
                resp = torch.nonzero(pos[b] & (seg == s)).squeeze(1)
                a = None
                if attn is not None:
                    cols = prompt_in & (seg_in == s)
                    a = attn[b][rows[resp]][:, cols].sum(-1)
                h = hist[b, resp] if hist is not None else None
                keep[b, resp] = sstoken_keep(token_loss[b, resp].detach(), h, a, self.p.rho, gamma)
        self._kept += int(keep.sum())
        self._valid += int(pos.sum())
        return weights * keep

    def _attention(self, net, ids) -> torch.Tensor:
        if self.attn is None:
            self.attn = capture_last_attention(net)
        got = self.attn.tokensift_attn
        if got is None or got.shape[0] != ids.shape[0] or got.shape[-1] != ids.shape[1]:
            with torch.no_grad():
                _logits(net, ids)
            got = self.attn.tokensift_attn
        self.attn.tokensift_attn = None
        return got

    def on_step_end(self, model) -> None:
        self.steps += 1
        if self.p.history == "ema" and self.history is not None:
            net = getattr(model, "module", model)
            with torch.no_grad():
                for h, w in zip(self.history.parameters(), net.parameters(), strict=True):
                    h.mul_(self.p.ema_decay).add_(w.detach().to(h.dtype), alpha=1 - self.p.ema_decay)

    def stats(self) -> dict[str, float]:
        kept = self._kept / self._valid if self._valid else 0.0
        self._kept = self._valid = 0
        return {"sstoken/kept_fraction": kept}
