"""ssToken: self-modulated and semantic-aware token selection (Qin et al., arXiv 2510.18250, ICLR 2026).

For one sample with prompt length p and response positions R = {p, ..., T-1} (index i = token i):

    REL_i   = l_hist(i) - l_cur(i)                         (history-model loss minus current loss)
    REL~_i  = (REL_i - min_R REL) / (max_R REL - min_R REL + 1e-8)
    A_i     = sum_{j < p} attn_last[i, j]                  (last layer, mean over heads, row of token i)
    score_i = gamma * REL~_i + (1 - gamma) * A_i

and the top ``ceil(rho * |R|)`` response positions are kept (weight 1), the rest and the prompt get 0;
the loss is the CE mean over kept tokens. Defaults rho = 0.6, gamma = 0.5 (the official code's CLI). The
history model is the base model (the release: a fixed pre-SFT model; online: the weights before the first
update) or, as an option, an EMA of the trained weights ``theta_hist <- d*theta_hist + (1-d)*theta`` after
each optimizer step. The prompt/response boundary and the documents of a packed row come from the data
(``loss_mask``, ``document_ids``), never from the loss weights. The release also uses
attention only (gamma_eff = 0) for its first 10k samples, since REL is ~0 while current = base; here that is
``rel_warmup_steps``. Checked against the official ``filter_tokens_with_attention_loss`` semantics.

The attention of the last decoder layer is captured during the normal forward by a wrapper attention
function (HF transformers models): the layer still runs its fast kernel and the head-averaged probabilities
are recomputed for that one layer only, as the release's hook variant does. The built-in GPT returns its
last layer's probabilities for ``output_attentions=True``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tokensift.models.gpt import GPT
from tokensift.models.packing import packed_forward, packed_logits
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
    rho: float = field(default=0.6, metadata={"gt": 0.0, "le": 1.0})
    gamma: float = field(default=0.5, metadata={"ge": 0.0, "le": 1.0})


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


HISTORIES = ("base", "ema")


@dataclass
class SSTokenParams:
    """Args:
    rho: share of each sample's response tokens kept.
    gamma: weight of the normalised loss reduction (``1 - gamma``: attention to the prompt).
    history: ``base`` (a frozen copy of the weights before the first update, the release) or ``ema`` (that
        copy, then ``theta_hist <- d*theta_hist + (1-d)*theta`` after every optimizer step).
    ema_decay: ``d`` of the EMA history.
    rel_warmup_steps: optimizer steps using attention only (gamma_eff = 0), as the release's warm-up.
    """

    rho: float = field(default=0.6, metadata={"gt": 0.0, "le": 1.0})
    gamma: float = field(default=0.5, metadata={"ge": 0.0, "le": 1.0})
    history: str = field(default="base", metadata={"choices": HISTORIES})
    ema_decay: float = field(default=0.99, metadata={"ge": 0.0, "le": 1.0})
    rel_warmup_steps: int = field(default=0, metadata={"ge": 0})


def prompt_inputs(loss_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: input position ``j`` holds a prompt token.

    Input ``j >= 1`` holds the token of label ``j - 1``, so it is prompt where ``loss_mask[j - 1] == 0``.
    Input 0's token is not a label of the row; it counts as prompt when the next token (label 0) is prompt
    (a prompt precedes its response).
    """
    return torch.cat([loss_mask[:, :1] == 0, loss_mask[:, :-1] == 0], dim=1)


def attention_to_prompt(attn: torch.Tensor, loss_mask: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """``A[b, t] = sum_{j in prompt(d)} attn~[b, t+1, j]``: label t's attention mass on its own document's prompt.

    Args:
        attn: [B, L, L] last-layer attention probabilities averaged over heads (row = query position).
        loss_mask: [B, L] 1 where label t is a response token.
        document_ids: [B, L] document of input position t (label t with weight > 0 is in the same one).

    Label t is token t+1, so its row is t+1 as in the release (the row's last label uses row L-1). ``attn~``
    is ``attn`` renormalised over the query's own document, which equals the attention of a forward whose
    documents were kept apart (softmax restricted to a block) whatever the captured forward did.
    """
    L = attn.shape[-1]
    rows = torch.clamp(torch.arange(L, device=attn.device) + 1, max=L - 1)
    same = document_ids[:, :, None] == document_ids[:, None, :]  # [B, query, key]
    a = attn.float() * same
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    cols = prompt_inputs(loss_mask)[:, None, :] & same[:, rows, :]  # key j: a prompt token of the query's doc
    return (a[:, rows, :] * cols).sum(-1)


class SSTokenScorer:
    """Online ssToken over the loader's packed rows, with the prompt/response structure from the batch.

    A *sample* is one document of a row (``document_ids``); its response is its labels with ``loss_mask``
    1 and positive weight; its prompt columns are its input positions holding prompt tokens
    (:func:`attention_to_prompt`). A batch without ``loss_mask`` is all response (no attention term), one
    without ``document_ids`` is one document per row. Returns ``weights * keep``.

    The history model is a frozen copy of the model taken at the first call, i.e. before the first update
    (the release's base model); ``ema`` then moves it after every step. Its weights and the step counter
    are the scorer's state (``state_dict``), restored on resume.
    """

    Params = SSTokenParams

    def __init__(self, params: SSTokenParams):
        _check(params.rho, params.gamma)
        if params.history not in HISTORIES or not 0 <= params.ema_decay <= 1:
            raise ValueError("sstoken: history must be 'base' or 'ema' and 0 <= ema_decay <= 1")
        self.p = params
        self.history = None
        self._pending: dict | None = None
        self.attn = None
        self.steps = 0
        self._kept = self._valid = 0

    def __call__(self, token_loss, logits, weights, batch, model) -> torch.Tensor:
        net = getattr(model, "module", model)
        if self.history is None and self.p.gamma > 0:
            self._make_history(net)
        gamma = self.p.gamma if self.steps >= self.p.rel_warmup_steps else 0.0
        ones = torch.ones_like(batch["input_ids"])
        loss_mask = batch.get("loss_mask", ones).bool()
        docs = batch.get("document_ids", ones * 0)
        hist = None
        if gamma > 0:
            with torch.no_grad():
                hl = packed_logits(self.history, batch)
                hist = F.cross_entropy(hl.float().transpose(1, 2), batch["labels"], reduction="none")
        attn = attention_to_prompt(self._attention(net, batch), loss_mask, docs) if gamma < 1 else None
        resp = (weights > 0) & loss_mask
        keep = torch.zeros_like(resp)
        for b in range(resp.shape[0]):
            for d in torch.unique(docs[b][resp[b]]):
                t = torch.nonzero(resp[b] & (docs[b] == d)).squeeze(1)
                h = hist[b, t] if hist is not None else None
                a = attn[b, t] if attn is not None else None
                keep[b, t] = sstoken_keep(token_loss[b, t].detach(), h, a, self.p.rho, gamma)
        self._kept += int(keep.sum())
        self._valid += int(resp.sum())
        return weights * keep

    def _make_history(self, net) -> None:
        self.history = copy.deepcopy(net).eval().requires_grad_(False)
        if self._pending is not None:
            self.history.load_state_dict(self._pending)
            self._pending = None

    def _attention(self, net, batch) -> torch.Tensor:
        """[B, L, L] last-layer attention of the current model, averaged over heads (no gradient)."""
        ids = batch["input_ids"]
        if isinstance(net, GPT):
            with torch.no_grad():
                return _gpt_attention(net, batch)
        if self.attn is None:
            self.attn = capture_last_attention(net)
        got = self.attn.tokensift_attn
        if got is None or got.shape[0] != ids.shape[0] or got.shape[-1] != ids.shape[1]:
            with torch.no_grad():
                packed_forward(net, batch)
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

    def state_dict(self) -> dict:
        """``steps`` and the history weights (``None`` before the first call)."""
        history = self.history.state_dict() if self.history is not None else self._pending
        return {"steps": self.steps, "history": None if history is None else {k: v.detach().cpu().clone() for k, v in history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        if state.get("history") is None:
            return
        if self.history is None:
            self._pending = dict(state["history"])
        else:
            self.history.load_state_dict(state["history"])


def _gpt_attention(net, batch) -> torch.Tensor:
    """The built-in GPT's last-layer attention ``[B, H, L, L]`` (``output_attentions=True``), head-averaged."""
    try:
        out = packed_forward(net, batch, output_attentions=True)
    except TypeError as e:
        raise ValueError(
            "sstoken: this built-in GPT's forward does not return attentions (output_attentions=True); "
            "use gamma: 1 (loss reduction only)"
        ) from e
    attn = out[-1] if isinstance(out, tuple) else getattr(out, "attentions", None)
    if isinstance(attn, (tuple, list)):
        attn = attn[-1]
    if not isinstance(attn, torch.Tensor) or attn.dim() != 4:
        raise ValueError("sstoken: the built-in GPT returned no [B, H, L, L] attention for output_attentions=True")
    return attn.float().mean(1)
