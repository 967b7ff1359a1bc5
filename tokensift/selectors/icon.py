"""ICon / RICo: in-context contribution of an instruction-tuning sample (Yang et al., AAAI 2026).

A candidate T is placed in context in front of every sample S = (x, y) of an assessment set, and the
target LM's perplexity on the response y is compared with a control context of random characters::

    I(T, S)      = (PPL_rand(S | T~) - PPL(S | T)) / (PPL(S) + 1e-6)
    Significance = g(mean_S I(T, S)),  g(u) = 2 / (1 + exp(-50 u)) - 1, and g = sign(u) when |u| > 0.5
    Consistency  = share of S with I > 0
    Stability    = sample variance of I (ddof 1; NaN for a single assessment sample)
    Coverage     = share of S with I > 0.5

``PPL(S)`` has no context; ``T~`` is a random string of the same character length as T (letters, digits,
punctuation, space). Only Significance is used for labels (ICon-guided selection):

1. ``icon_score`` (map stage, LM actors, ``icon_stage.py``): the statistics above for a seeded subset of the
   pool (the paper: 5,000 of 52,002 Alpaca samples against 1,020 assessment samples).
2. ``icon`` (select stage, below): the top p % (default 15) of the scored subset by Significance are
   positives, a classifier (fastText by default; the paper fine-tunes a LoRA classifier on the LLM) learns
   them, scores every row in linear time, and the top p % of the pool is kept.
3. ``icon_classify`` (map stage) + ``score_threshold``: the saved classifier scores further pools on actors.

The LM side (token layout, prefix KV reuse, random control) is in ``icon_scorer.py``, the labels and the
classifier in ``icon_classifier.py``.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from tokensift.pipeline import schema
from tokensift.pipeline.registry import register
from tokensift.pipeline.stage import Selection
from tokensift.selectors.fasttext_text import FastTextParams
from tokensift.selectors.icon_classifier import (
    candidate_texts,
    icon_fasttext_params,
    keep_count,
    significance_labels,
    train_icon_classifier,
)
from tokensift.selectors.icon_lm_classifier import LMClassifierParams, load_icon_classifier
from tokensift.selectors.icon_scorer import TEMPLATE
from tokensift.selectors.threshold import top_p_order

SCALE = 50.0  # slope of g at 0 (reference: sigmoid_map(x, scale=50))
EPS = 1e-6  # added to PPL(S) in the denominator (reference value)


def influence(ppl_with_context, ppl_with_random, ppl_without) -> np.ndarray:
    """Pair influences ``I = (PPL_rand(S|T~) - PPL(S|T)) / (PPL(S) + 1e-6)``, one per assessment sample.

    Args:
        ppl_with_context: PPL(S | T) per assessment sample.
        ppl_with_random: PPL_rand(S | T~) per assessment sample (random context of the same length).
        ppl_without: PPL(S) per assessment sample (no context).
    """
    arrays = []
    for name, values in (
        ("ppl_with_context", ppl_with_context),
        ("ppl_with_random", ppl_with_random),
        ("ppl_without", ppl_without),
    ):
        a = np.asarray(values, dtype=np.float64)
        if a.ndim != 1:
            raise ValueError(f"icon.influence: {name} must be one-dimensional, got shape {a.shape}")
        if not np.isfinite(a).all() or (a <= 0).any():
            raise ValueError(f"icon.influence: {name} must hold finite positive perplexities")
        arrays.append(a)
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"icon.influence: lengths differ: {[len(a) for a in arrays]}")
    ctx, rand, base = arrays
    return (rand - ctx) / (base + EPS)


def squash(u: float) -> float:
    """``g(u) = 2 / (1 + exp(-50 u)) - 1``, clipped to -1 / +1 when ``|u| > 0.5``."""
    if u > 0.5:
        return 1.0
    if u < -0.5:
        return -1.0
    return 2.0 / (1.0 + math.exp(-SCALE * u)) - 1.0


def significance(influences) -> float:
    """Significance of one candidate: ``g(mean I)`` over its assessment-set influences."""
    a = _influences(influences)
    return squash(float(a.mean()))


def contribution(influences) -> dict[str, float]:
    """All four per-candidate statistics the reference records, plus the mean influence and n."""
    a = _influences(influences)
    return {
        "significance": squash(float(a.mean())),
        "consistency": float((a > 0).mean()),
        "stability": float(a.var(ddof=1)) if len(a) > 1 else math.nan,
        "coverage": float((a > 0.5).mean()),
        "mean_influence": float(a.mean()),
        "n": len(a),
    }


def score_candidate(scorer, text: str, key: str) -> dict:
    """Statistics of one candidate from an ``IConScorer``: contribution(), influences, PPLs, forward passes."""
    ppl = scorer.perplexities(text, key)
    pairs = influence(ppl["ppl_with_context"], ppl["ppl_with_random"], ppl["ppl_without"])
    return {**contribution(pairs), **ppl, "influences": pairs}


def _influences(influences) -> np.ndarray:
    a = np.asarray(influences, dtype=np.float64)
    if a.ndim != 1 or len(a) == 0:
        raise ValueError(f"icon: influences must be a non-empty 1-D array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("icon: influences must be finite")
    return a


@dataclass
class IConParams:
    """Args:
    top_p: share labelled positive among the scored candidates and share of the pool kept (paper: 15 %).
    significance_column: written by ``icon_score`` (null for rows outside its scored subset).
    prompt_column: candidate instruction column (null rows use ``text_column``).
    response_column: candidate response column.
    text_column: plain text column.
    template: instruction format (as in ``icon_score``).
    classifier_kind: ``fasttext`` (the CPU default) or ``lm`` (the paper's: a LoRA classifier on the scoring LM).
    classifier: fastText settings.
    lm_classifier: the LoRA classifier's settings (``classifier_kind: lm``).
    classifier_path: where the trained classifier is saved, to score other pools with ``icon_classify``
        (``None``: a temporary file).
    test_share: last share of the scored candidates held out to measure the classifier (reference 10 %).
    """

    top_p: float = field(default=0.15, metadata={"gt": 0, "lt": 1})
    significance_column: str = "icon_significance"
    prompt_column: str | None = "prompt"
    response_column: str | None = "response"
    text_column: str = schema.TEXT
    template: str = TEMPLATE
    classifier_kind: str = field(default="fasttext", metadata={"choices": ("fasttext", "lm")})
    classifier: FastTextParams = field(default_factory=icon_fasttext_params)
    lm_classifier: LMClassifierParams = field(default_factory=LMClassifierParams)
    classifier_path: str | None = None
    test_share: float = field(default=0.1, metadata={"ge": 0, "lt": 1})


@register("icon", kind="select", params=IConParams)
class ICon:
    """Label the top p % of the scored subset, train the classifier, score every row, keep the top p %."""

    def __init__(self, params: IConParams):
        self.p = params

    @classmethod
    def needs(cls, p: IConParams) -> list[str]:
        return [c for c in (p.significance_column, p.text_column, p.prompt_column, p.response_column) if c]

    def select(self, table: pa.Table) -> Selection:
        p = self.p
        ids = np.asarray(table.column(schema.ID).to_pylist(), dtype=object)
        texts = candidate_texts(table, p.prompt_column, p.response_column, p.text_column, p.template)
        sig = table.column(p.significance_column).to_numpy(zero_copy_only=False).astype(np.float64)
        scored = np.flatnonzero(~np.isnan(sig))
        labels, threshold = significance_labels(sig[scored], p.top_p)
        with tempfile.TemporaryDirectory(prefix="tokensift-icon-") as tmp:
            path = Path(p.classifier_path or Path(tmp) / "icon-classifier.bin")
            settings = p.lm_classifier if p.classifier_kind == "lm" else p.classifier
            stats = train_icon_classifier([texts[i] for i in scored], labels, path, settings, p.test_share)
            proba = load_icon_classifier(path).proba(texts).astype(np.float64)
        order = top_p_order(proba, ids)
        kept = order[: keep_count(p.top_p, len(ids))]
        stats.update(
            scored=len(scored),
            significance_threshold=threshold,
            positives=int(labels.sum()),
            classifier_path=p.classifier_path,
            kept_docs=len(kept),
            total_docs=len(ids),
            score_threshold=float(proba[kept[-1]]) if len(kept) else None,
        )
        return Selection(ids=ids[kept].tolist(), scores=proba[kept].tolist(), stats=stats)
