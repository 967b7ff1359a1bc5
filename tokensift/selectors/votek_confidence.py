"""Map stage ``votek_confidence``: the LM's confidence on each document, for two-phase vote-k.

Vote-k (Su et al., "Selective Annotation Makes Language Models Better Few-Shot Learners", ICLR 2023) splits
its budget: phase 1 picks diverse documents by the vote-k graph; phase 2 has the LM predict every unlabeled
example and buckets the pool by the LM's confidence, least confident first (``tokensift.selectors.votek``,
``confidence_column``). For generation tasks the paper's confidence is a sequence score of the model's own
output: the mean token log-probability of what it generates (nq: ``mean token logprob`` from the Codex API),

    conf(x) = (1/|y|) sum_t log p(y_t | x, y_<t),   y = the model's greedy output for x (up to EOS or
                                                     ``max_new_tokens``).

Higher is more confident. The paper prompts with the phase-1 examples most similar to x as demonstrations;
this stage runs before any selection, so it scores zero-shot (x alone), which lets ``votek`` run both phases
from raw text in one pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from tokensift.models.causal_lm import SMOLLM2, load_causal_lm
from tokensift.pipeline import schema
from tokensift.pipeline.registry import register


@dataclass
class VoteKConfidenceParams:
    """Args:
    model: a local HF causal LM directory, or ``smollm2`` for the shipped SmolLM2-135M-Instruct.
    gguf_file: a GGUF file inside ``model``.
    text_column: the input the model answers (a prompt column, or the document text).
    column: the confidence column written (float64; pass it to ``votek`` as ``confidence_column``).
    max_input_tokens: inputs keep their last this many tokens.
    max_new_tokens: longest greedy output scored.
    batch_size: inputs per generate call (left-padded).
    dtype: ``auto``, ``float32`` or ``bfloat16``.
    device: ``cpu``, ``cuda``...
    """

    model: str = SMOLLM2
    gguf_file: str | None = None
    text_column: str = schema.TEXT
    column: str = "votek_confidence"
    max_input_tokens: int = field(default=256, metadata={"ge": 1})
    max_new_tokens: int = field(default=16, metadata={"ge": 1})
    batch_size: int = field(default=8, metadata={"ge": 1})
    dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "bfloat16")})
    device: str = "cpu"


def output_confidence(model, tokenizer, texts: list[str], max_input_tokens: int, max_new_tokens: int) -> np.ndarray:
    """Mean log-probability of each text's greedy continuation under ``model`` (one ``generate`` call)."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_input_tokens:] or [tokenizer.eos_token_id]
            for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=pad)
    logp = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).float()
    new = out.sequences[:, width:]
    ended = torch.cumsum((new == tokenizer.eos_token_id).int(), dim=1)
    keep = (ended == 0) | ((ended == 1) & (new == tokenizer.eos_token_id))  # up to and including the first EOS
    return ((logp * keep).sum(1) / keep.sum(1).clamp_min(1)).double().cpu().numpy()


@register("votek_confidence", kind="map", params=VoteKConfidenceParams)
class VoteKConfidence:
    """Writes ``column``: the mean token log-probability of the LM's greedy output for each document."""

    def __init__(self, params: VoteKConfidenceParams):
        self.p = params
        self.model, self.tok = load_causal_lm(params.model, gguf_file=params.gguf_file, dtype=params.dtype,
                                              device=params.device)

    @classmethod
    def needs(cls, p: VoteKConfidenceParams) -> list[str]:
        return [p.text_column]

    @classmethod
    def adds(cls, p: VoteKConfidenceParams) -> list[str]:
        return [p.column]

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.p.text_column).to_pylist()
        for r, t in enumerate(texts):
            if t is None:
                raise ValueError(f"votek_confidence: row {r}: column {self.p.text_column!r} is null")
        conf = np.zeros(len(texts))
        for lo in range(0, len(texts), self.p.batch_size):
            part = texts[lo : lo + self.p.batch_size]
            conf[lo : lo + len(part)] = output_confidence(self.model, self.tok, part, self.p.max_input_tokens,
                                                          self.p.max_new_tokens)
        return batch.append_column(self.p.column, pa.array(conf, pa.float64()))
