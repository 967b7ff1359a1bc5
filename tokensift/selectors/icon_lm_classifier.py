"""ICon's LM classifier: a LoRA sequence classifier on the scoring LM (the paper's choice), beside fastText.

ICon (``tokensift.selectors.icon``) labels the top p % of its scored subset by Significance and trains a
classifier to carry the labels to the whole pool. The paper fine-tunes the target LLM itself as a binary
sequence classifier with LoRA; this module does that with ``peft``: ``AutoModelForSequenceClassification``
on the scoring LM (the last token's final hidden state -> a linear head of 2 classes), LoRA adapters on the
attention projections, the head trained in full (``modules_to_save``), AdamW on the cross-entropy. fastText
(``tokensift.selectors.icon_classifier``) stays the CPU default; this one wants a GPU at pool scale.

A trained classifier is a directory: the adapter and head (``save_pretrained``) plus ``tokensift_lm.json``
naming the base model, so :func:`load_icon_classifier` can tell it from a fastText ``.bin`` file.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tokensift.models.causal_lm import SMOLLM2, resolve, torch_dtype

MARKER = "tokensift_lm.json"


@dataclass
class LMClassifierParams:
    """Args:
    model: the base LM (a local HF directory, or ``smollm2``); the scoring LM of ``icon_score``.
    gguf_file: a GGUF file inside ``model``.
    lora_r, lora_alpha, lora_dropout: the LoRA adapters (on ``target_modules``).
    target_modules: the projections adapted.
    epochs: passes over the labelled rows.
    lr: AdamW learning rate.
    batch_size: rows per step (and per scoring forward).
    max_length: tokens per text (longer texts keep their first ``max_length``).
    dtype: ``auto``, ``float32`` or ``bfloat16``.
    device: ``cpu``, ``cuda``...
    seed: shuffling and initialisation seed.
    """

    model: str = SMOLLM2
    gguf_file: str | None = None
    lora_r: int = field(default=16, metadata={"ge": 1})
    lora_alpha: int = field(default=32, metadata={"ge": 1})
    lora_dropout: float = field(default=0.05, metadata={"ge": 0.0, "lt": 1.0})
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    epochs: int = field(default=2, metadata={"ge": 1})
    lr: float = field(default=2e-4, metadata={"gt": 0.0})
    batch_size: int = field(default=8, metadata={"ge": 1})
    max_length: int = field(default=256, metadata={"ge": 8})
    dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "bfloat16")})
    device: str = "cpu"
    seed: int = 0


def _base(p: LMClassifierParams):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    local = resolve(p.model, p.gguf_file)
    tok = AutoTokenizer.from_pretrained(local)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    torch.manual_seed(p.seed)
    model = AutoModelForSequenceClassification.from_pretrained(local, num_labels=2, dtype=torch_dtype(p.dtype, p.device))
    model.config.pad_token_id = tok.pad_token_id
    return model.to(p.device), tok


def _encode(tok, texts: list[str], max_length: int, device: str) -> dict:
    return tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)


def train_lm_classifier(texts: list[str], labels: np.ndarray, out: str | Path, p: LMClassifierParams) -> list[float]:
    """Fine-tune LoRA adapters and the head on ``(texts, labels)``; save to directory ``out``; the step losses."""
    from peft import LoraConfig, TaskType, get_peft_model

    model, tok = _base(p)
    cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                     target_modules=list(p.target_modules))
    model = get_peft_model(model, cfg)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=p.lr, weight_decay=0.0)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    rng, losses = random.Random(p.seed), []
    model.train()
    for _ in range(p.epochs):
        order = list(range(len(texts)))
        rng.shuffle(order)
        for lo in range(0, len(order), p.batch_size):
            idx = order[lo : lo + p.batch_size]
            logits = model(**_encode(tok, [texts[i] for i in idx], p.max_length, p.device)).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), y[idx].to(logits.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    out = Path(out)
    model.save_pretrained(out)
    (out / MARKER).write_text(json.dumps(asdict(p)))
    return losses


class LMClassifierScorer:
    """P(label 1) from a classifier saved by :func:`train_lm_classifier` (``proba(texts)``)."""

    def __init__(self, path: str | Path, device: str | None = None):
        from peft import PeftModel

        saved = json.loads((Path(path) / MARKER).read_text())
        self.p = LMClassifierParams(**{**saved, **({"device": device} if device else {})})
        base, self.tok = _base(self.p)
        self.model = PeftModel.from_pretrained(base, str(path)).eval()

    @torch.no_grad()
    def proba(self, texts: list[str]) -> np.ndarray:
        out = np.zeros(len(texts), np.float32)
        for lo in range(0, len(texts), self.p.batch_size):
            part = texts[lo : lo + self.p.batch_size]
            logits = self.model(**_encode(self.tok, part, self.p.max_length, self.p.device)).logits.float()
            out[lo : lo + len(part)] = logits.softmax(-1)[:, 1].cpu().numpy()
        return out


def load_icon_classifier(path: str | Path):
    """A scorer with ``proba(texts)``: the LM classifier for a directory holding ``tokensift_lm.json``, else fastText."""
    if (Path(path) / MARKER).is_file():
        return LMClassifierScorer(path)
    from tokensift.selectors.fasttext_text import FastTextScorer

    return FastTextScorer(path)
