"""Map stage ``embed``: unit-norm sentence embeddings from a sentence-transformers-style model.

The model is a local directory (or a hub name when a network exists) holding a transformers encoder, as
sentence-transformers saves it; plain ``transformers`` runs it, so sentence-transformers is not needed.
Pooling follows the model's ``1_Pooling/config.json`` (mean over non-padding tokens when absent):

    e(x) = normalize( sum_t m_t h_t(x) / sum_t m_t )      (mean pooling, m = attention mask)

and the maximum sequence length follows ``sentence_bert_config.json`` unless ``max_length`` is set.
The default model is the shipped all-MiniLM-L6-v2 (384-d, ``tokensift.models.assets.minilm_path()``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from tokensift.pipeline import schema
from tokensift.pipeline.registry import register

DEFAULT_MAX_LENGTH = 512


@dataclass
class EmbedParams:
    """Args:
    model: local model directory or hub name (``None``: the shipped all-MiniLM-L6-v2).
    text_column: column embedded.
    column: output column (``fixed_size_list<float32>``).
    device: torch device of the encoder (``cpu``, ``cuda``, ``cuda:1``...).
    max_length: truncate to this many tokens (``None``: the model's ``max_seq_length``).
    batch_size: texts per forward pass (a Ray batch is split into these).
    normalize: scale every embedding to unit L2 norm.
    """

    model: str | None = None
    text_column: str = schema.TEXT
    column: str = schema.EMBEDDING
    device: str = "cpu"
    max_length: int | None = field(default=None, metadata={"ge": 1})
    batch_size: int = field(default=32, metadata={"ge": 1})
    normalize: bool = True


class Encoder:
    """A sentence encoder loaded once: ``encode(texts) -> float32 array (n, d)``."""

    def __init__(self, model: str | None = None, device: str = "cpu", max_length: int | None = None,
                 batch_size: int = 32, normalize: bool = True):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from tokensift.models.assets import minilm_path

        path = model or minilm_path()
        self.pooling = _pooling_mode(path)
        self.max_length = max_length or _max_seq_length(path)
        self.batch_size = batch_size
        self.normalize = normalize
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embeddings of ``texts`` in their order (texts are length-sorted inside to reduce padding)."""
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                enc = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out[rows] = pooled.float().cpu().numpy()
        return out


@register("embed", kind="map", params=EmbedParams)
class Embed:
    """Writes ``embedding`` (``fixed_size_list<float32>[d]``), one vector per row."""

    def __init__(self, params: EmbedParams):
        self.p = params
        self.encoder = Encoder(params.model, params.device, params.max_length, params.batch_size,
                               params.normalize)

    @classmethod
    def needs(cls, p: EmbedParams) -> list[str]:
        return [p.text_column]

    @classmethod
    def adds(cls, p: EmbedParams) -> list[str]:
        return [p.column]

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.p.text_column).to_pylist()
        nulls = [i for i, t in enumerate(texts) if t is None]
        if nulls:
            raise ValueError(f"embed: column {self.p.text_column!r} is null in row {nulls[0]} of the batch")
        vectors = self.encoder.encode(texts)
        return batch.append_column(self.p.column, schema.embedding_array(vectors))


def _pooling_mode(path: str) -> str:
    """``mean`` or ``cls`` from a sentence-transformers ``1_Pooling/config.json`` (``mean`` when absent)."""
    cfg_file = Path(path) / "1_Pooling" / "config.json"
    if not cfg_file.is_file():
        return "mean"
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    raise ValueError(f"{cfg_file}: only mean or CLS pooling is supported, got {cfg}")


def _max_seq_length(path: str) -> int:
    """``max_seq_length`` from ``sentence_bert_config.json``, else :data:`DEFAULT_MAX_LENGTH`."""
    cfg_file = Path(path) / "sentence_bert_config.json"
    if cfg_file.is_file():
        return int(json.loads(cfg_file.read_text()).get("max_seq_length", DEFAULT_MAX_LENGTH))
    return DEFAULT_MAX_LENGTH
