"""The LM side of ICon: PPL(S), PPL(S | T) and the random-context control PPL_rand(S | T~).

Token layout, as in the RICo reference (each piece tokenized on its own, then concatenated)::

    PPL(S)      : [bos] x y                              loss on y only
    PPL(S | T)  : [bos] T[:2040 tokens] "\\n\\n\\n" x y  loss on y only
    x, y        : truncated to 1024 tokens each

T is the candidate's formatted prompt followed directly by its response (``template.format(prompt=...)
+ response``) or a plain document. ``[bos]`` is whatever the tokenizer puts in front of a text (nothing for
SmolLM2, ``<|begin_of_text|>`` for LLaMA-3). Two reference quirks are not copied: it slices off the first
token of every later piece (a BOS for LLaMA, a real token for tokenizers without one) and, counting the
sliced BOS tokens in the label offset, leaves the first two response tokens out of PPL(S | T) but not out
of PPL(S).

Cost: the reference runs one forward pass per (candidate, assessment sample) pair and context, i.e.
2 n passes per candidate over ``|T| + |x y|`` tokens each. Here the context ``[bos] T "\\n\\n\\n"`` is a
shared prefix: its KV cache is computed once (LM head at its last position only) and the n suffixes ``x y``
are scored behind it in batches of ``max_batch_tokens`` suffix positions and at most ``batch_size`` rows
(``prefix_token_losses`` of ``models/scoring.py``), so a candidate costs ``2 (1 + batches)`` passes that
run each context token once instead of n times. The random control is one string per candidate
(seeded by ``seed`` and the candidate key) so that it is a shared prefix too; ``control="per_pair"`` draws
a fresh string per pair as the reference does (no prefix reuse for the control then).
"""

from __future__ import annotations

import math
import random
import string
from contextlib import contextmanager

import numpy as np

from tokensift.models.scoring import DEFAULT_MAX_TOKENS, plain_head, prefix_token_losses, token_losses

ALPHABET = string.ascii_letters + string.punctuation + string.digits + " "
TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:"
SEPARATOR = "\n\n\n"
CONTROLS = ("per_candidate", "per_pair", "none")


def random_control(n_chars: int, key: str) -> str:
    """A random string of ``n_chars`` characters from letters, punctuation, digits and space, seeded by key."""
    rng = random.Random(key)
    return "".join(rng.choice(ALPHABET) for _ in range(n_chars))


def candidate_text(prompt: str | None, response: str | None, text: str, template: str = TEMPLATE) -> str:
    """The in-context text of a candidate: formatted prompt + response, or the plain document."""
    if prompt is None or response is None:
        return text
    return template.format(prompt=prompt) + response


class IConScorer:
    """Scores candidates against one assessment set with one causal LM.

    Args:
        model: a causal LM in eval mode (see ``tokensift.models.causal_lm.load_causal_lm``).
        tokenizer: its tokenizer.
        assessment: ``(x, y)`` pairs: formatted assessment input and its response.
        max_context_tokens: candidate truncation (reference: 2040).
        max_segment_tokens: truncation of x and of y (reference: 1024).
        batch_size: at most this many assessment samples per forward pass (``None``: only ``max_batch_tokens``).
        max_batch_tokens: padded token positions per forward pass (suffix positions behind a cached context).
        kv_reuse: score suffixes behind the cached context (``False``: one full sequence per pair, batched).
        control: ``per_candidate`` (one seeded random string per candidate), ``per_pair`` (one per pair, as
            the reference) or ``none`` (the v1 paper's score: PPL(S) stands in for the control).
        seed: seed of the random control strings.
    """

    def __init__(
        self,
        model,
        tokenizer,
        assessment: list[tuple[str, str]],
        max_context_tokens: int = 2040,
        max_segment_tokens: int = 1024,
        batch_size: int | None = None,
        max_batch_tokens: int = DEFAULT_MAX_TOKENS,
        kv_reuse: bool = True,
        control: str = "per_candidate",
        seed: int = 0,
    ):
        if control not in CONTROLS:
            raise ValueError(f"icon control must be one of {CONTROLS}, got {control!r}")
        if not assessment:
            raise ValueError("icon: the assessment set is empty")
        self.model, self.tok = model, tokenizer
        self.max_context_tokens, self.batch_size, self.max_tokens = max_context_tokens, batch_size, max_batch_tokens
        self.kv_reuse, self.control, self.seed = kv_reuse, control, seed
        self.bos = list(tokenizer("", add_special_tokens=True)["input_ids"])
        self.sep = self._encode(SEPARATOR)
        self.inputs, self.n_response = [], []
        for i, (x, y) in enumerate(assessment):
            xs, ys = self._encode(x)[:max_segment_tokens], self._encode(y)[:max_segment_tokens]
            if not ys:
                raise ValueError(f"icon: assessment sample {i} has an empty response")
            if not xs and not self.bos:
                raise ValueError(f"icon: assessment sample {i} has an empty input (and the tokenizer adds no BOS)")
            self.inputs.append(xs + ys)
            self.n_response.append(len(ys))
        plain_head(model)  # the engine's one-time check of the LM head, outside the counted passes
        self.forward_passes = self.tokens_computed = 0
        with self._counting():
            self.ppl_without = self._ppl_no_context()

    @contextmanager
    def _counting(self):
        """Count the model's forward passes and the token positions they compute while inside.

        The hook sits on the decoder (``base_model``), which every scoring pass runs.
        """

        def hook(_module, _args, kwargs, _output):
            self.forward_passes += 1
            self.tokens_computed += kwargs["input_ids"].numel()

        handle = self.model.base_model.register_forward_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _ppl(self, losses: list[np.ndarray]) -> np.ndarray:
        """exp(mean NLL of the response tokens) from per-token losses aligned with ``self.inputs``."""
        out = []
        for i, lo in enumerate(losses):
            y = lo[len(self.inputs[i]) - self.n_response[i] :]
            if len(y) == 0:
                raise ValueError(f"icon: assessment sample {i} does not fit the model's context window")
            out.append(math.exp(float(np.mean(y, dtype=np.float64))))
        return np.asarray(out)

    def _ppl_no_context(self) -> np.ndarray:
        if self.bos:
            return self.ppl_with_prefix(self.bos)
        seqs = token_losses(self.model, self.inputs, self.batch_size, self.max_tokens)
        # without a BOS the first token has no loss: losses[t] is for token t + 1
        return self._ppl([np.concatenate([[np.nan], lo]) for lo in seqs])

    def ppl_with_prefix(self, prefix: list[int]) -> np.ndarray:
        """PPL of every assessment response behind one token prefix (KV reuse or naive batching)."""
        if self.kv_reuse:
            return self._ppl(prefix_token_losses(self.model, prefix, self.inputs, self.batch_size, self.max_tokens))
        full = token_losses(self.model, [prefix + s for s in self.inputs], self.batch_size, self.max_tokens)
        return self._ppl([lo[len(prefix) - 1 :] for lo in full])

    def context_prefix(self, text: str) -> list[int]:
        """``[bos] text[:max_context_tokens] "\\n\\n\\n"`` as token ids."""
        return self.bos + self._encode(text)[: self.max_context_tokens] + self.sep

    def ppl_per_pair_control(self, n_chars: int, key: str) -> np.ndarray:
        """Control PPLs with a fresh random string for every assessment sample (reference behaviour)."""
        seqs = [
            self.context_prefix(random_control(n_chars, f"{self.seed}:{key}:{j}")) + s
            for j, s in enumerate(self.inputs)
        ]
        full = token_losses(self.model, seqs, self.batch_size, self.max_tokens)
        return self._ppl([lo[len(seq) - len(s) - 1 :] for lo, seq, s in zip(full, seqs, self.inputs, strict=True)])

    def perplexities(self, text: str, key: str) -> dict:
        """PPL(S | T), PPL_rand(S | T~) and PPL(S) of every assessment sample for candidate ``text``.

        ``key`` (the candidate id) seeds the random control; ``forward_passes`` counts the model calls and
        ``tokens_computed`` the token positions they ran (padding included, cached prefix positions not).
        """
        before, tokens_before = self.forward_passes, self.tokens_computed
        with self._counting():
            ppl_ctx = self.ppl_with_prefix(self.context_prefix(text))
            if self.control == "per_candidate":
                control = random_control(len(text), f"{self.seed}:{key}")
                ppl_rand = self.ppl_with_prefix(self.context_prefix(control))
            elif self.control == "per_pair":
                ppl_rand = self.ppl_per_pair_control(len(text), key)
            else:
                ppl_rand = self.ppl_without
        return {
            "ppl_with_context": ppl_ctx,
            "ppl_with_random": ppl_rand,
            "ppl_without": self.ppl_without,
            "forward_passes": self.forward_passes - before,
            "tokens_computed": self.tokens_computed - tokens_before,
        }
