"""Select stage ``score_threshold``: keep the top share of documents by a score column, exactly.

Documents are ranked by score (descending by default; ties broken by id, so the result does not depend
on shard order). With ``weight: chars`` the kept set is the shortest prefix of that ranking whose
character mass reaches ``top_p`` of the total; with ``weight: docs`` it is ``ceil(top_p * n)`` documents.
The ranking is over every gathered row, so the threshold is exact across shards, never estimated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from tokensift.pipeline import schema
from tokensift.pipeline.registry import register
from tokensift.pipeline.stage import Selection


@dataclass
class ThresholdParams:
    """Args:
    column: the score column (e.g. ``preselect_score``).
    top_p: share to keep, in (0, 1].
    weight: ``chars`` (share of character mass) or ``docs`` (share of documents).
    descending: keep the highest scores (``False``: the lowest).
    """

    column: str = "score"
    top_p: float = 0.1
    weight: str = "chars"
    descending: bool = True


@register("score_threshold", kind="select", params=ThresholdParams)
class ScoreThreshold:
    def __init__(self, params: ThresholdParams):
        if not 0 < params.top_p <= 1:
            raise ValueError(f"score_threshold.top_p must be in (0, 1], got {params.top_p}")
        if params.weight not in ("chars", "docs"):
            raise ValueError(f"score_threshold.weight must be 'chars' or 'docs', got {params.weight!r}")
        self.p = params

    @classmethod
    def needs(cls, p: ThresholdParams) -> list[str]:
        return [p.column] + ([schema.N_CHARS] if p.weight == "chars" else [])

    def select(self, table: pa.Table) -> Selection:
        ids = np.asarray(table.column(schema.ID).to_pylist(), dtype=object)
        scores = table.column(self.p.column).to_numpy(zero_copy_only=False).astype(np.float64)
        if np.isnan(scores).any():
            bad = ids[np.isnan(scores)][0]
            raise ValueError(f"score_threshold: column {self.p.column!r} is NaN for id {bad!r}")
        mass = (
            table.column(schema.N_CHARS).to_numpy(zero_copy_only=False).astype(np.float64)
            if self.p.weight == "chars"
            else np.ones(len(ids))
        )
        order = top_p_order(scores, ids, self.p.descending)
        n_keep = _prefix_length(mass[order], self.p.top_p)
        kept = order[:n_keep]
        return Selection(
            ids=ids[kept].tolist(),
            scores=scores[kept].tolist(),
            stats={
                "column": self.p.column,
                "threshold": float(scores[kept[-1]]) if n_keep else None,
                "kept_docs": int(n_keep),
                "total_docs": len(ids),
                "kept_mass": float(mass[kept].sum()),
                "total_mass": float(mass.sum()),
                "weight": self.p.weight,
            },
        )


def top_p_order(scores: np.ndarray, ids: np.ndarray, descending: bool = True) -> np.ndarray:
    """Indices sorted by score (descending by default), ties by id ascending: a shard-independent order."""
    key = -scores if descending else scores
    return np.lexsort((ids.astype(str), key))


def _prefix_length(mass: np.ndarray, top_p: float) -> int:
    """Smallest k with sum(mass[:k]) >= top_p * sum(mass) (k >= 1 when any mass exists)."""
    if len(mass) == 0:
        return 0
    cum = np.cumsum(mass)
    target = top_p * cum[-1]
    if target <= 0:
        return math.ceil(top_p * len(mass))
    return int(np.searchsorted(cum, target * (1 - 1e-12), side="left")) + 1
