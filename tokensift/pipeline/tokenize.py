"""Map stage ``tokenize``: text (or prompt + response) to ``input_ids``.

The tokenizer is an HF tokenizer from a local directory (optionally a GGUF file inside it) or a hub name
when a network exists, or ``byte``: UTF-8 bytes as ids 0-255 with EOS 256, which needs nothing.
With ``prompt_column``/``response_column`` the two are tokenized separately and concatenated, and
``prompt_length`` records how many leading tokens are prompt (token scorers weight only the response).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from tokensift.pipeline import schema
from tokensift.pipeline.registry import register

BYTE_EOS = 256


@dataclass
class TokenizeParams:
    """Args:
    tokenizer: ``byte``, a local tokenizer directory, or a hub name.
    gguf_file: a GGUF file inside ``tokenizer`` to read the tokenizer from.
    text_column: column tokenized when no prompt/response columns are given.
    prompt_column: column holding the prompt (rows where it is null use ``text_column``).
    response_column: column holding the response.
    add_eos: append the end-of-sequence token.
    max_length: truncate to this many tokens (``None``: no limit).
    """

    tokenizer: str = "byte"
    gguf_file: str | None = None
    text_column: str = schema.TEXT
    prompt_column: str | None = None
    response_column: str | None = None
    add_eos: bool = True
    max_length: int | None = None


@register("tokenize", kind="map", params=TokenizeParams)
class Tokenize:
    """Writes ``input_ids`` (list<int32>), ``n_tokens`` (int32) and, with a prompt column, ``prompt_length``."""

    def __init__(self, params: TokenizeParams):
        self.p = params
        self.encode, self.eos = _load(params.tokenizer, params.gguf_file)

    @classmethod
    def needs(cls, p: TokenizeParams) -> list[str]:
        return [c for c in (p.text_column, p.prompt_column, p.response_column) if c]

    @classmethod
    def adds(cls, p: TokenizeParams) -> list[str]:
        return [schema.INPUT_IDS, "n_tokens"] + ([schema.PROMPT_LENGTH] if p.prompt_column else [])

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.p.text_column).to_pylist()
        if self.p.prompt_column:
            prompts = batch.column(self.p.prompt_column).to_pylist()
            responses = batch.column(self.p.response_column).to_pylist()
        else:
            prompts = responses = [None] * len(texts)
        rows, prompt_lengths = [], []
        for text, prompt, response in zip(texts, prompts, responses, strict=True):
            head = self.encode(prompt) if prompt is not None else []
            tail = self.encode(response if prompt is not None else text)
            ids = head + tail + ([self.eos] if self.p.add_eos and self.eos is not None else [])
            if self.p.max_length is not None:
                ids = ids[: self.p.max_length]
            rows.append(np.asarray(ids, dtype=np.int32))
            prompt_lengths.append(min(len(head), len(ids)))
        batch = batch.append_column(schema.INPUT_IDS, schema.ragged_column(rows, schema.TOKEN_IDS_TYPE))
        batch = batch.append_column("n_tokens", pa.array([len(r) for r in rows], pa.int32()))
        if self.p.prompt_column:
            batch = batch.append_column(schema.PROMPT_LENGTH, pa.array(prompt_lengths, pa.int32()))
        return batch


def _load(name: str, gguf_file: str | None):
    """Return ``(encode(text) -> list[int], eos_id)`` for the byte tokenizer or an HF tokenizer."""
    if name == "byte":
        return (lambda text: list(text.encode("utf-8"))), BYTE_EOS
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name, gguf_file=gguf_file) if gguf_file else AutoTokenizer.from_pretrained(name)
    return (lambda text: tok(text, add_special_tokens=False)["input_ids"]), tok.eos_token_id
