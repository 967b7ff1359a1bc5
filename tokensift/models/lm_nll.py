"""Map stage ``lm_nll``: whole-document negative log-likelihood under one causal LM (PreSelect's losses).

For a document x of C characters, tokenized by the LM's own tokenizer into t_1..t_L with a BOS t_0 prepended:

    NLL(x) = -Σ_{k=1..L} ln p(t_k | t_0..t_{k-1})   (nats)        BPC(x) = NLL(x) / (C ln 2)

Both are whole-string quantities, so they compare across models with different tokenizers (mean
per-token loss does not). A document longer than ``max_length`` tokens is scored with a sliding window
(HF's "perplexity of fixed-length models"): windows of ``max_length`` tokens start every ``stride`` tokens
and each scores only the tokens its predecessor did not, so every token is scored once with at least
``max_length - stride`` tokens of context. PreSelect's reference slides a 1901-token window with stride 512
over documents concatenated without separators; here each document is scored on its own (no context from
unrelated neighbours, no unscored tail).

One stage scores one model; a config lists one ``lm_nll`` entry per model, each with its own ``name``
(columns ``<name>_nll`` and ``<name>_bpc``, float64). Total NLLs of long documents are large numbers whose
order between models matters, hence float64.

Windows are scored by the engine in ``scoring.py``: batches of ``max_batch_tokens`` padded positions from
length-sorted windows; each actor runs as many torch threads as it has CPUs (``resources.num_cpus``,
rounded up), or on its GPU with ``device: cuda`` and ``resources.num_gpus``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from tokensift.config import ConfigError
from tokensift.models.causal_lm import DTYPES
from tokensift.models.scoring import DEFAULT_MAX_TOKENS, token_losses, use_assigned_cpus
from tokensift.pipeline import schema
from tokensift.pipeline.registry import register


@dataclass
class LMNLLParams:
    """Args:
    model: a local HF model directory (or a hub name when a network exists).
    gguf_file: a GGUF file inside ``model`` (dequantized once and cached).
    name: column prefix: writes ``<name>_nll`` and ``<name>_bpc``.
    text_column: the column scored.
    max_length: tokens per window (``None``: the model's ``max_position_embeddings``).
    stride: new tokens per window for documents longer than ``max_length`` (``None``: ``max_length // 2``).
    add_bos: prepend the tokenizer's BOS (its EOS when it has none) so the first token is scored too.
    max_batch_tokens: padded token positions per forward pass (about 4k on CPUs; 16k-64k on a GPU).
    batch_size: at most this many windows per forward pass (``None``: only ``max_batch_tokens``).
    dtype: ``auto`` (float32 on CPUs, bfloat16 on GPUs), ``float32``, ``bfloat16`` or ``float16``.
    device: ``cpu``, ``cuda``, ``cuda:1``... (``cuda`` with ``resources.num_gpus``: the actor's GPU).
    """

    model: str = ""
    gguf_file: str | None = None
    name: str = "lm"
    text_column: str = schema.TEXT
    max_length: int | None = field(default=None, metadata={"ge": 2})
    stride: int | None = field(default=None, metadata={"ge": 1})
    add_bos: bool = True
    max_batch_tokens: int = field(default=DEFAULT_MAX_TOKENS, metadata={"ge": 1})
    batch_size: int | None = field(default=None, metadata={"ge": 1})
    dtype: str = field(default="auto", metadata={"choices": DTYPES})
    device: str = "cpu"


def nll_columns(name: str) -> tuple[str, str]:
    """The two columns an ``lm_nll`` stage named ``name`` writes: total NLL (nats) and bits per character."""
    return f"{name}_nll", f"{name}_bpc"


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over a sequence: ``(begin, end, n_new)`` with the last ``n_new`` targets of each scored.

    Targets are token positions 1..n-1; each is scored by exactly one window, with context from ``begin``.
    """
    if not 0 < stride < max_length:
        raise ValueError(f"lm_nll: need 0 < stride < max_length, got stride={stride}, max_length={max_length}")
    out, prev_end = [], 1  # position 0 (the BOS or first token) is context only
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + max_length, n_tokens)
        if end > prev_end:
            out.append((begin, end, end - prev_end))
            prev_end = end
        if end == n_tokens:
            break
    return out


def document_nll(
    model,
    sequences: list[list[int]],
    max_length: int,
    stride: int,
    batch_size: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> np.ndarray:
    """Total NLL (nats, float64) of each token sequence, every token after the first scored once.

    Args:
        model: a causal LM (``tokensift.models.causal_lm.load_causal_lm``).
        sequences: token ids per document (BOS already prepended when wanted).
        max_length: tokens per window.
        stride: new tokens per window after the first.
        batch_size: at most this many windows per forward pass (``None``: only ``max_tokens``).
        max_tokens: padded token positions per forward pass.
    """
    chunks, owner, n_new = [], [], []
    for doc, ids in enumerate(sequences):
        for begin, end, new in windows(len(ids), max_length, stride):
            chunks.append(ids[begin:end])
            owner.append(doc)
            n_new.append(new)
    totals = np.zeros(len(sequences), dtype=np.float64)
    for doc, new, losses in zip(owner, n_new, token_losses(model, chunks, batch_size, max_tokens), strict=True):
        totals[doc] += losses[len(losses) - new :].sum(dtype=np.float64)
    return totals


@register("lm_nll", kind="map", params=LMNLLParams)
class LMNLL:
    """Writes ``<name>_nll`` (total NLL, nats) and ``<name>_bpc`` (bits per character; NaN for empty text)."""

    def __init__(self, params: LMNLLParams):
        from tokensift.models.causal_lm import load_causal_lm

        if not params.model:
            raise ValueError("lm_nll.model: a model directory (or hub name) is required")
        if params.max_length:
            windows(2, params.max_length, params.stride or params.max_length // 2)  # checks the stride early
        self.p = params
        use_assigned_cpus()
        self.model, self.tok = load_causal_lm(params.model, params.gguf_file, params.dtype, params.device)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = params.max_length or limit
        if not self.max_length or (limit and self.max_length > limit):
            raise ValueError(f"lm_nll.max_length: {params.max_length} exceeds the model's context ({limit})")
        self.stride = params.stride or self.max_length // 2
        bos = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        self.prefix = [bos] if params.add_bos and bos is not None else []

    @classmethod
    def needs(cls, p: LMNLLParams) -> list[str]:
        if not p.model:  # checked here too so a run fails before any work starts
            raise ConfigError("lm_nll.model: a model directory (or hub name) is required")
        return [p.text_column]

    @classmethod
    def adds(cls, p: LMNLLParams) -> list[str]:
        return list(nll_columns(p.name))

    def __call__(self, batch: pa.Table) -> pa.Table:
        column = batch.column(self.p.text_column)
        if column.null_count:
            row = column.is_null().to_numpy(zero_copy_only=False).argmax()
            raise ValueError(f"lm_nll: column {self.p.text_column!r} is null for id {batch.column(schema.ID)[row]}")
        texts = column.to_pylist()
        encoded = self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        nll = document_nll(
            self.model,
            [self.prefix + ids for ids in encoded],
            self.max_length,
            self.stride,
            self.p.batch_size,
            self.p.max_batch_tokens,
        )
        chars = np.array([len(t) for t in texts], dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            bpc = np.where(chars > 0, nll / (chars * math.log(2)), np.nan)
        nll_col, bpc_col = nll_columns(self.p.name)
        batch = batch.append_column(nll_col, pa.array(nll, pa.float64()))
        return batch.append_column(bpc_col, pa.array(bpc, pa.float64()))
