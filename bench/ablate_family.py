"""PreSelect's model family here: N = 5 causal LMs of different quality, and whole-string NLL under each.

- Four built-in GPTs (byte tokens, ``FAMILY``) trained with the DeepSpeed trainer
  (``examples/ablate/train.yaml``) on the pool: two sizes on the corpus' general mix (news, math, code,
  instructions), and two of the small size on mixtures that favour one domain (all of its documents, a
  seventh of the others by id hash). Size and data both move a model's quality on the target benchmark, as
  they do across the paper's LLaMA family, so documents can disagree with the benchmark order.
- The shipped SmolLM2-135M-Instruct (its own 49k-token vocabulary, pretrained on trillions of tokens).

Tokenizers differ, so documents compare by whole-string NLL or bits per character, never per-token loss.
Every model scores the same strings: a document's longest prefix of at most ``MAX_BYTES`` UTF-8 bytes,
which with the GPTs' start token fills exactly one GPT context (``SEQ``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

SEQ = 256  # the GPTs' context (bytes)
MAX_BYTES = SEQ - 1
EOS = 256  # the byte tokenizer's end-of-document id, here the start token before a string
FAMILY = {  # name -> (layers, width, heads, training steps of 16 x SEQ bytes, favoured domain or None)
    "gpt-2x64-mix": (2, 64, 4, 150, None),
    "gpt-2x64-math": (2, 64, 4, 150, "math"),
    "gpt-2x64-news": (2, 64, 4, 150, "news"),
    "gpt-4x128-mix": (4, 128, 4, 300, None),
}


def cut(text: str) -> str:
    """The longest prefix of ``text`` whose UTF-8 encoding has at most ``MAX_BYTES`` bytes."""
    return text.encode()[:MAX_BYTES].decode("utf-8", "ignore")


def train_family(pool, work: Path, steps_share: float = 1.0, log=print) -> dict[str, dict]:
    """Train every GPT of ``FAMILY`` on its mixture of ``pool`` (``bench.ablate_select.Pool``); name ->
    ``{"model", "params", "steps", "focus", "seconds"}``."""
    from bench.ablate_select import id_hash
    from bench.ablate_train import train_arm

    out = {}
    for name, (layers, width, heads, steps, focus) in FAMILY.items():
        steps, data = max(1, round(steps * steps_share)), Path(work) / name / "data"
        ids = [i for i in pool.ids if focus is None or pool.domain[i] == focus or id_hash(i) % 7 == 0]
        pool.snapshot(ids, data, budget=sum(pool.tokens[i] for i in ids))
        model, stats = train_arm(data, Path(work) / name / "train", 0, [
            f"model.gpt.n_layer={layers}", f"model.gpt.n_embd={width}", f"model.gpt.n_head={heads}",
            f"model.gpt.block_size={SEQ}", f"data.seq_len={SEQ}", f"max_steps={steps}"])
        out[name] = {"model": model, "params": sum(p.numel() for p in model.parameters()), "steps": steps,
                     "focus": focus, "seconds": stats["seconds"]}
        log(f"family {name}: {steps} steps in {stats['seconds']:.0f} s")
    return out


@torch.inference_mode()
def gpt_nll(model, texts: list[str], rows: int = 32) -> np.ndarray:
    """Whole-string NLL (nats, float64) under a byte GPT: the start token, then every UTF-8 byte scored."""
    seqs = [[EOS, *t.encode()] for t in texts]
    if any(len(s) > model.config.block_size for s in seqs):
        raise ValueError(f"gpt_nll: a string is longer than the GPT's context ({model.config.block_size - 1} bytes)")
    out = np.zeros(len(seqs), dtype=np.float64)
    for lo in range(0, len(seqs), rows):
        batch = seqs[lo : lo + rows]
        width = max(len(s) for s in batch)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in batch])  # right padding: causal, never attended
        nll = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                reduction="none").view(len(batch), -1)
        for r, s in enumerate(batch):
            out[lo + r] = nll[r, : len(s) - 1].sum(dtype=torch.float64).item()
    return out


def hf_nll(model, tok, texts: list[str]) -> np.ndarray:
    """Whole-string NLL (nats, float64) under an HF causal LM, BOS first (as ``lm_nll`` scores)."""
    from tokensift.models.lm_nll import document_nll

    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    seqs = [[bos, *tok(t, add_special_tokens=False)["input_ids"]] for t in texts]
    longest = max(len(s) for s in seqs)
    return document_nll(model, seqs, max_length=longest, stride=max(longest - 1, 1))  # one window per string


def bits_per_char(nll: np.ndarray, texts: list[str]) -> np.ndarray:
    """NLL (nats) -> bits per character of each string."""
    return nll / (np.array([max(len(t), 1) for t in texts], dtype=np.float64) * math.log(2))
