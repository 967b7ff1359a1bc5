"""ICon-guided selection, classifier side: labels from Significance, a fastText classifier, pool scoring.

Labels follow the RICo reference: threshold = the (1 - p) quantile (linear interpolation, as pandas) of the
scored subset's Significance, label 1 when Significance >= threshold; the first 90 % of the scored rows
(in pool order) train the classifier, the last 10 % measure it. The paper's classifier is a LoRA sequence
classifier on the target LLM (``tokensift.selectors.icon_lm_classifier``: pass ``LMClassifierParams``); the
default here is fastText on CPU (``tokensift.selectors.fasttext_text``, shared with PreSelect), with settings
sized for a few thousand labelled samples. The input text is the candidate's formatted prompt followed by its
response, as in the reference.

Map stage ``icon_classify`` scores any pool with a saved classifier on Ray actors (linear time) and writes
``icon_classify_score`` = P(label 1); ``score_threshold`` with ``weight: docs`` then keeps the top p %.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from tokensift.pipeline import schema
from tokensift.pipeline.registry import register
from tokensift.selectors.fasttext_text import SCORING_RESOURCES, FastTextParams, train_classifier
from tokensift.selectors.icon_lm_classifier import (
    LMClassifierParams,
    load_icon_classifier,
    train_lm_classifier,
)
from tokensift.selectors.icon_scorer import TEMPLATE, candidate_text

CLASSIFY_SCORE = schema.score_column("icon_classify")


def icon_fasttext_params() -> FastTextParams:
    """fastText settings for a few thousand labelled candidates (the PreSelect defaults, epoch 3 and lr 0.1,
    barely move on so little data): 25 epochs, lr 0.5, dim 50, word bigrams, 200k buckets."""
    return FastTextParams(epoch=25, lr=0.5, word_ngrams=2, dim=50, bucket=200_000)


def significance_labels(significance: np.ndarray, top_p: float) -> tuple[np.ndarray, float]:
    """Label 1 for Significance >= the ``1 - top_p`` quantile (reference rule); returns (labels, threshold)."""
    sig = np.asarray(significance, dtype=np.float64)
    if len(sig) == 0:
        raise ValueError("icon: no scored candidates to label (is icon_score's subset empty?)")
    threshold = float(np.quantile(sig, 1.0 - top_p))
    return (sig >= threshold).astype(np.int64), threshold


def train_icon_classifier(
    texts: list[str], labels: np.ndarray, out: str | Path, params: FastTextParams | LMClassifierParams,
    test_share: float = 0.1,
) -> dict:
    """Train on the first ``1 - test_share`` of the rows, measure on the rest; returns statistics.

    Args:
        params: ``FastTextParams`` (a fastText file at ``out``) or ``LMClassifierParams`` (a LoRA classifier
            directory at ``out``).
    """
    n_test = int(len(texts) * test_share)
    n_train = len(texts) - n_test
    train_labels = [str(v) for v in labels[:n_train]]
    if len(set(train_labels)) < 2:
        raise ValueError(
            f"icon: the {n_train} training candidates all have label {train_labels[0] if train_labels else None}; "
            "score more candidates (icon_score.subset_fraction) or raise top_p"
        )
    if isinstance(params, LMClassifierParams):
        train_lm_classifier(texts[:n_train], labels[:n_train], out, params)
    else:
        train_classifier(texts[:n_train], train_labels, out, params)
    stats = {"train_rows": n_train, "test_rows": n_test, "train_positives": int(labels[:n_train].sum())}
    if n_test:
        proba = load_icon_classifier(out).proba(texts[n_train:])
        truth = labels[n_train:]
        stats["test_accuracy"] = float(((proba >= 0.5) == (truth == 1)).mean())
        stats["test_auc"] = auc(proba, truth)
    return stats


def auc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half; ``None`` with one class only."""
    pos, neg = scores[truth == 1], scores[truth == 0]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def candidate_texts(table: pa.Table, prompt_column, response_column, text_column: str, template: str) -> list[str]:
    """The classifier's input text of every row (formatted prompt + response, or the plain text)."""
    n = table.num_rows
    texts = table.column(text_column).to_pylist()
    prompts = table.column(prompt_column).to_pylist() if prompt_column else [None] * n
    responses = table.column(response_column).to_pylist() if response_column else [None] * n
    return [candidate_text(p, r, t, template) for p, r, t in zip(prompts, responses, texts, strict=True)]


def keep_count(top_p: float, n: int) -> int:
    """``floor(top_p * n)`` (reference), at least one document of a non-empty pool."""
    return min(n, max(1, math.floor(top_p * n))) if n else 0


@dataclass
class IConClassifyParams:
    """Args:
    classifier: the classifier the ``icon`` select stage wrote (``classifier_path``): a fastText file or an
        LM classifier directory.
    prompt_column: candidate instruction column (null rows use ``text_column``).
    response_column: candidate response column.
    text_column: plain text column.
    template: format of the instruction (must match the one the classifier was trained with).
    """

    classifier: str = ""
    prompt_column: str | None = "prompt"
    response_column: str | None = "response"
    text_column: str = schema.TEXT
    template: str = TEMPLATE


@register("icon_classify", kind="map", params=IConClassifyParams)
class IConClassify:
    """Writes ``icon_classify_score`` = P(label 1) of a trained ICon classifier, for every row."""

    default_resources = SCORING_RESOURCES  # Ray tasks inside the read tasks, one CPU each

    def __init__(self, params: IConClassifyParams):
        if not params.classifier:
            raise ValueError("icon_classify.classifier is not set: give the model file the icon stage wrote")
        self.p = params
        self.scorer = load_icon_classifier(params.classifier)

    @classmethod
    def needs(cls, p: IConClassifyParams) -> list[str]:
        return [c for c in (p.text_column, p.prompt_column, p.response_column) if c]

    @classmethod
    def adds(cls, p: IConClassifyParams) -> list[str]:
        return [CLASSIFY_SCORE]

    def __call__(self, batch: pa.Table) -> pa.Table:
        p = self.p
        texts = candidate_texts(batch, p.prompt_column, p.response_column, p.text_column, p.template)
        return batch.append_column(CLASSIFY_SCORE, pa.array(self.scorer.proba(texts), pa.float32()))
