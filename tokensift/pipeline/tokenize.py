"""Map stage ``tokenize``: text, prompt + response, or a conversation to ``input_ids`` and a ``loss_mask``.

The tokenizer is an HF tokenizer from a local directory (optionally a GGUF file inside it) or a hub name
when a network exists, or ``byte``: UTF-8 bytes as ids 0-255 with EOS 256, which needs nothing.

Structure as data: with ``prompt_column``/``response_column`` (plain concatenation, or the tokenizer's chat
template with ``chat_template: true``) or a ``messages_column`` of conversations (``[{role, content}]`` or
ShareGPT ``[{from, value}]``, rendered by the chat template), the stage writes ``loss_mask`` (list<int8>,
same length as ``input_ids``): 1 on response (assistant) tokens, the ones SFT trains on, 0 on prompt and
template tokens. ``prompt_length`` is the number of tokens before the first response token. Rows without a
prompt (a null prompt: ``text_column`` is used) get a mask of ones. A chat turn's tokens are found by
rendering the conversation up to each assistant turn (with the generation prompt) and up to its end: the
tokens in between, the reply and its end-of-turn marker, are the response.

Pairs (cDPO, ``tokensift.trainers.dpo``): with ``rejected_column`` the row's ``input_ids`` is prompt + the
chosen response and ``rejected_input_ids``/``rejected_loss_mask`` hold prompt + the rejected response.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from tokensift.config import ConfigError
from tokensift.pipeline import schema
from tokensift.pipeline.registry import register

BYTE_EOS = 256
LOSS_MASK = schema.LOSS_MASK
LOSS_MASK_TYPE = pa.list_(pa.int8())
REJECTED = "rejected_"  # prefix of the rejected side's columns of a preference pair
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class TokenizeParams:
    """Args:
    tokenizer: ``byte``, a local tokenizer directory, or a hub name.
    gguf_file: a GGUF file inside ``tokenizer`` to read the tokenizer from.
    text_column: column tokenized when no prompt/response columns are given.
    prompt_column: column holding the prompt (rows where it is null use ``text_column``).
    response_column: column holding the response.
    rejected_column: column holding a rejected response (preference pairs; needs ``prompt_column``).
    messages_column: column holding conversations (list of ``{role, content}`` or ``{from, value}``).
    chat_template: render prompt/response as a user/assistant exchange with the tokenizer's chat template.
    add_eos: append the end-of-sequence token (not with a chat template: it ends turns itself).
    max_length: truncate to this many tokens (``None``: no limit).
    """

    tokenizer: str = "byte"
    gguf_file: str | None = None
    text_column: str = schema.TEXT
    prompt_column: str | None = None
    response_column: str | None = None
    rejected_column: str | None = None
    messages_column: str | None = None
    chat_template: bool = False
    add_eos: bool = True
    max_length: int | None = None


@register("tokenize", kind="map", params=TokenizeParams)
class Tokenize:
    """Writes ``input_ids`` (list<int32>), ``n_tokens`` (int32) and, with structure, ``prompt_length`` and ``loss_mask``."""

    def __init__(self, params: TokenizeParams):
        _check(params)
        self.p = params
        self.tok = None if params.tokenizer == "byte" else _hf_tokenizer(params.tokenizer, params.gguf_file)
        self.eos = BYTE_EOS if self.tok is None else self.tok.eos_token_id
        if (params.chat_template or params.messages_column) and getattr(self.tok, "chat_template", None) is None:
            raise ConfigError(f"tokenize: tokenizer {params.tokenizer!r} has no chat template")

    @classmethod
    def needs(cls, p: TokenizeParams) -> list[str]:
        if p.messages_column:
            return [p.messages_column]
        return [c for c in (p.text_column, p.prompt_column, p.response_column, p.rejected_column) if c]

    @classmethod
    def adds(cls, p: TokenizeParams) -> list[str]:
        out = [schema.INPUT_IDS, "n_tokens"]
        if p.prompt_column or p.messages_column:
            out += [schema.PROMPT_LENGTH, LOSS_MASK]
        if p.rejected_column:
            out += [REJECTED + schema.INPUT_IDS, REJECTED + LOSS_MASK]
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.p.messages_column:
            rows = [self._conversation(m, r) for r, m in enumerate(batch.column(self.p.messages_column).to_pylist())]
        elif self.p.prompt_column:
            rows = self._pairs(batch, self.p.response_column)
        else:
            rows = [self._finish(self._encode(t), None) for t in batch.column(self.p.text_column).to_pylist()]
        ids = [r[0] for r in rows]
        batch = batch.append_column(schema.INPUT_IDS, schema.ragged_column(ids, schema.TOKEN_IDS_TYPE))
        batch = batch.append_column("n_tokens", pa.array([len(r) for r in ids], pa.int32()))
        if self.p.prompt_column or self.p.messages_column:
            batch = _with_structure(batch, rows, "")
        if self.p.rejected_column:
            rejected = self._pairs(batch, self.p.rejected_column)
            batch = batch.append_column(
                REJECTED + schema.INPUT_IDS, schema.ragged_column([r[0] for r in rejected], schema.TOKEN_IDS_TYPE)
            )
            batch = _with_structure(batch, rejected, REJECTED, prompt_length=False)
        return batch

    def _encode(self, text: str) -> list[int]:
        if self.tok is None:
            return list(text.encode("utf-8"))
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _finish(self, ids: list[int], mask: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
        """Append EOS (trained, as part of the response) when asked, truncate, and default the mask to ones."""
        mask = [1] * len(ids) if mask is None else mask
        if self.p.add_eos and self.eos is not None and not self._chat:
            ids, mask = ids + [self.eos], mask + [1]
        if self.p.max_length is not None:
            ids, mask = ids[: self.p.max_length], mask[: self.p.max_length]
        return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.int8)

    @property
    def _chat(self) -> bool:
        return bool(self.p.chat_template or self.p.messages_column)

    def _pairs(self, batch: pa.Table, response_column: str) -> list[tuple[np.ndarray, np.ndarray]]:
        texts = batch.column(self.p.text_column).to_pylist() if self.p.text_column in batch.column_names else None
        prompts = batch.column(self.p.prompt_column).to_pylist()
        responses = batch.column(response_column).to_pylist()
        out = []
        for r, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            if prompt is None:
                if texts is None or texts[r] is None:
                    raise ValueError(f"tokenize: row {r}: column {self.p.prompt_column!r} is null and there is no text")
                out.append(self._finish(self._encode(texts[r]), None))
                continue
            if response is None:
                raise ValueError(f"tokenize: row {r}: column {response_column!r} is null where the prompt is set")
            if self.p.chat_template:
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
                out.append(self._finish(*self._render(messages, r)))
            else:
                head, tail = self._encode(prompt), self._encode(response)
                out.append(self._finish(head + tail, [0] * len(head) + [1] * len(tail)))
        return out

    def _conversation(self, messages, row: int) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"tokenize: row {row}: column {self.p.messages_column!r} is not a non-empty list of turns")
        turns = []
        for m in messages:
            role = _ROLES.get(str(m.get("role", m.get("from")))) if isinstance(m, dict) else None
            if role is None:
                raise ValueError(
                    f"tokenize: row {row}: column {self.p.messages_column!r}: turn {m!r} needs a role "
                    f"({', '.join(sorted(_ROLES))})"
                )
            turns.append({"role": role, "content": str(m.get("content", m.get("value", "")))})
        return self._finish(*self._render(turns, row))

    def _render(self, messages: list[dict], row: int) -> tuple[list[int], list[int]]:
        """Token ids of the templated conversation and its mask (1 on each assistant turn's tokens)."""
        ids = self._template(messages, False)
        mask = [0] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start, end = self._template(messages[:i], True), self._template(messages[: i + 1], False)
            if ids[: len(end)] != end or end[: len(start)] != start:
                raise ValueError(
                    f"tokenize: row {row}: the chat template does not render turn {i} as a prefix of the "
                    "conversation, so its response tokens cannot be located"
                )
            mask[len(start) : len(end)] = [1] * (len(end) - len(start))
        return ids, mask

    def _template(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return self._encode(text)


def _with_structure(batch: pa.Table, rows, prefix: str, prompt_length: bool = True) -> pa.Table:
    """Append ``<prefix>loss_mask`` (and ``prompt_length``: tokens before the first response token)."""
    masks = [r[1] for r in rows]
    if prompt_length:
        first = [int(np.argmax(m)) if m.any() else len(m) for m in masks]
        batch = batch.append_column(schema.PROMPT_LENGTH, pa.array(first, pa.int32()))
    return batch.append_column(prefix + LOSS_MASK, schema.ragged_column(masks, LOSS_MASK_TYPE))


def _check(p: TokenizeParams) -> None:
    if p.messages_column and (p.prompt_column or p.rejected_column):
        raise ConfigError("tokenize: give either messages_column or prompt_column/response_column, not both")
    if p.prompt_column and not p.response_column:
        raise ConfigError("tokenize: prompt_column needs response_column")
    if p.rejected_column and not p.prompt_column:
        raise ConfigError("tokenize: rejected_column needs prompt_column and response_column")
    if (p.chat_template or p.messages_column) and p.tokenizer == "byte":
        raise ConfigError("tokenize: the byte tokenizer has no chat template")


def _hf_tokenizer(name: str, gguf_file: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, gguf_file=gguf_file) if gguf_file else AutoTokenizer.from_pretrained(name)
