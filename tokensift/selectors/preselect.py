"""PreSelect (Shum et al. 2025, "Predictive Data Selection: The Data That Predicts Is the Data That Teaches").

The whole method, as the paper and its reference code (hkust-nlp/PreSelect) define it:

1. Losses: a sample of documents is scored under N causal LMs whose benchmark scores b_1..b_N are
   known; ℓ_i(d) is document d's whole-document NLL (or bits per character) under model i (map stage
   ``lm_nll``, tokensift/models/lm_nll.py). Never mean per-token loss: token counts differ across tokenizers.
2. Predictive strength, per document:
       S(d) = Σ_{i<j} 1[(b_i > b_j and ℓ_i(d) < ℓ_j(d)) or (b_i < b_j and ℓ_i(d) > ℓ_j(d))],
   the number of model pairs whose loss order agrees with their benchmark order (a tie in either gives 0).
3. Labels: positives are the documents with S = S_max, the number of pairs with distinct benchmarks (loss
   order matches benchmark order exactly; 15 for the paper's six LLaMA models). Negatives: as many
   documents again, taken in ascending S with ties by id (the reference leaves this order undefined).
4. A fastText classifier on ``__label__1`` / ``__label__0`` lines with the paper's settings (epoch 3,
   lr 0.1, wordNgrams 2, dim 100): :func:`train`, or ``tokensift preselect-train``.
5. Map stage ``preselect``: ``preselect_score`` = P(__label__1 | text) for every document of the pool.
6. Select stage ``score_threshold`` (``column: preselect_score, top_p: 0.1, weight: chars``): the top 10 %
   of the pool by character mass, exact over all shards (the reference estimates it on 3 % of shards).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from tokensift.config import ConfigError
from tokensift.pipeline import schema
from tokensift.pipeline.registry import register
from tokensift.selectors.fasttext_text import (
    LABEL_PREFIX,
    SCORING_RESOURCES,
    FastTextParams,
    FastTextScorer,
    train_classifier,
)

SCORE = schema.score_column("preselect")


def predictive_strength(losses, benchmark) -> np.ndarray:
    """S(d): how many model pairs have their loss order agree with their benchmark order.

    Args:
        losses: ``n_docs x n_models`` whole-document NLL or BPC (lower = better fit).
        benchmark: ``n_models`` benchmark scores (higher = better model).

    Returns:
        ``n_docs`` int64 in ``[0, max_strength(benchmark)]``. A pair tied in loss or in benchmark counts 0.
    """
    losses = np.asarray(losses, dtype=np.float64)
    bench = np.asarray(benchmark, dtype=np.float64)
    if losses.ndim != 2 or bench.ndim != 1 or losses.shape[1] != bench.shape[0]:
        raise ValueError(f"predictive_strength: losses {losses.shape} must be n_docs x {bench.shape[0]} (one per model)")
    bad = ~np.isfinite(losses)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"predictive_strength: loss of document row {row}, model {col} is {losses[row, col]}")
    i, j = np.triu_indices(bench.shape[0], k=1)
    # agree when the better-benchmark model has the strictly lower loss: sign(b_i - b_j) == sign(ℓ_j - ℓ_i) != 0
    agree = np.sign(bench[i] - bench[j])[None, :] * np.sign(losses[:, j] - losses[:, i]) > 0
    return agree.sum(axis=1).astype(np.int64)


def max_strength(benchmark) -> int:
    """The largest possible S: the number of model pairs with distinct benchmark scores."""
    bench = np.asarray(benchmark, dtype=np.float64)
    i, j = np.triu_indices(bench.shape[0], k=1)
    return int((bench[i] != bench[j]).sum())


@dataclass
class Labels:
    """PreSelect training labels over a losses table.

    Args:
        strength: S(d) for every document kept (rows with a missing loss are dropped, as in the reference).
        positives: row indices (into the input) of the S = S_max documents, ordered by id.
        negatives: row indices of as many lowest-S documents, ordered by (S, id).
        stats: counts for the manifest / CLI output.
    """

    strength: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray
    stats: dict = field(default_factory=dict)


def label_documents(ids, losses, benchmark) -> Labels:
    """Positives (S = S_max) and an equal number of negatives (ascending S, ties by id).

    Documents with a NaN or missing loss for any model are skipped (counted in ``stats["skipped"]``). When
    fewer documents than positives have S < S_max, every one of them is a negative.

    Args:
        ids: document ids, one per row (the deterministic tie order).
        losses: ``n_docs x n_models`` whole-document NLL or BPC.
        benchmark: ``n_models`` benchmark scores.
    """
    ids = np.asarray(ids, dtype=object).astype(str)
    losses = np.asarray(losses, dtype=np.float64)
    if len(ids) != len(losses):
        raise ValueError(f"label_documents: {len(ids)} ids but {len(losses)} loss rows")
    top = max_strength(benchmark)
    if top == 0:
        raise ValueError(f"label_documents: benchmark scores {list(benchmark)} are all equal; no pair can agree")
    rows = np.flatnonzero(np.isfinite(losses).all(axis=1))
    strength = np.full(len(ids), -1, dtype=np.int64)
    strength[rows] = predictive_strength(losses[rows], benchmark)
    pos = rows[strength[rows] == top]
    pos = pos[np.argsort(ids[pos], kind="stable")]
    if len(pos) == 0:
        raise ValueError(f"label_documents: no document's loss order matches the benchmark order (S = {top})")
    rest = rows[strength[rows] < top]
    if len(rest) == 0:
        raise ValueError(f"label_documents: all {len(rows)} documents have S = {top}; no negatives to train on")
    neg = rest[np.lexsort((ids[rest], strength[rest]))][: len(pos)]
    counts = np.bincount(strength[rows], minlength=top + 1)
    stats = {
        "documents": len(ids),
        "skipped": len(ids) - len(rows),
        "max_strength": top,
        "positives": len(pos),
        "negatives": len(neg),
        "strength_histogram": counts.tolist(),
        "negative_max_strength": int(strength[neg].max()) if len(neg) else None,
    }
    return Labels(strength=strength, positives=pos, negatives=neg, stats=stats)


def train(
    table: pa.Table,
    benchmark: dict[str, float],
    out: str | Path,
    params: FastTextParams | None = None,
    text_column: str = schema.TEXT,
) -> dict:
    """Losses table -> labels -> fastText model file; returns the label statistics.

    Args:
        table: one row per document with ``id``, ``text_column`` and one loss column per model.
        benchmark: loss column -> that model's benchmark score, e.g. ``{"llama7b_bpc": 75.38, ...}``.
        out: where the ``.bin`` model is written.
        params: fastText settings (PreSelect's by default; shrink ``bucket`` for small data).
        text_column: the document text column.
    """
    columns = list(benchmark)
    missing = [c for c in [schema.ID, text_column, *columns] if c not in table.column_names]
    if missing:
        raise ValueError(f"preselect.train: losses table has no column(s) {missing}; it has {table.column_names}")
    losses = np.column_stack(
        [table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in columns]
    )
    labels = label_documents(table.column(schema.ID).to_pylist(), losses, [benchmark[c] for c in columns])
    texts = table.column(text_column).to_pylist()
    rows = np.concatenate([labels.positives, labels.negatives])
    names = ["1"] * len(labels.positives) + ["0"] * len(labels.negatives)
    train_classifier([texts[i] for i in rows], names, out, params)
    return {**labels.stats, "benchmark": dict(benchmark), "model": str(out)}


@dataclass
class PreSelectParams:
    """Args:
    model: the fastText ``.bin`` file (``tokensift preselect-train`` writes one); absolute, or relative
        to the directory the job is started from.
    text_column: the column scored.
    label: the positive label whose probability becomes ``preselect_score``.
    """

    model: str = ""
    text_column: str = schema.TEXT
    label: str = f"{LABEL_PREFIX}1"


@register("preselect", kind="map", params=PreSelectParams)
class PreSelect:
    """Writes ``preselect_score`` (float32): P(label | normalised text) under the fastText model."""

    default_resources = SCORING_RESOURCES  # Ray tasks inside the read tasks, one CPU each

    def __init__(self, params: PreSelectParams):
        if not params.model:
            raise ValueError("preselect.model: path to a fastText model file is required")
        self.p = params
        self.scorer = FastTextScorer(params.model, params.label)

    @classmethod
    def needs(cls, p: PreSelectParams) -> list[str]:
        if not p.model:  # checked here too so a run fails before any work starts
            raise ConfigError("preselect.model: path to a fastText model file is required")
        if not Path(p.model).is_file():
            raise ConfigError(f"preselect.model: fastText model not found: {p.model}")
        return [p.text_column]

    @classmethod
    def adds(cls, p: PreSelectParams) -> list[str]:
        return [SCORE]

    def __call__(self, batch: pa.Table) -> pa.Table:
        column = batch.column(self.p.text_column)
        if column.null_count:
            row = column.is_null().to_numpy(zero_copy_only=False).argmax()
            raise ValueError(f"preselect: column {self.p.text_column!r} is null for id {batch.column(schema.ID)[row]}")
        scores = self.scorer.proba(column.to_pylist())
        return batch.append_column(SCORE, pa.array(scores, type=pa.float32()))
