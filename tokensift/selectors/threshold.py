"""Select stage ``score_threshold``: keep the top share of documents by a score column, exactly.

Documents are ranked by score (descending by default; ties broken by id, so the result does not depend
on shard order). With ``weight: chars`` the kept set is the shortest prefix of that ranking whose
character mass reaches ``top_p`` of the total; with ``weight: docs`` it is ``ceil(top_p * n)`` documents.
The ranking is over every row, so the threshold is exact across shards, never estimated.

Over sharded data the runner never gathers the scores: float64 scores map to order-preserving uint64 keys,
each shard reports ``{bin: [rows, mass]}`` for the top 16 key bits, the coordinator walks the merged bins in
ranking order to the bin where the kept mass reaches ``top_p`` (splitting that bin by the next 16 bits while
it holds more than ``MAX_GATHER`` rows), and only that bin's rows are gathered and ranked. Rows of bins
before it are kept by the key bound alone: the coordinator holds O(bins + rows of one bin), not O(rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
    top_p: float = field(default=0.1, metadata={"gt": 0, "le": 1})
    weight: str = field(default="chars", metadata={"choices": ("chars", "docs")})
    descending: bool = True


@register("score_threshold", kind="select", params=ThresholdParams)
class ScoreThreshold:
    ranked = False  # the kept rows are those scoring past the cut: no rank column (sort by the score)

    def __init__(self, params: ThresholdParams):
        self.p = params

    @classmethod
    def needs(cls, p: ThresholdParams) -> list[str]:
        return [p.column] + ([schema.N_CHARS] if p.weight == "chars" else [])

    def select(self, table: pa.Table) -> Selection:
        """The selection over one gathered table (the definition; the runner uses the sharded form below)."""
        ids, scores, mass = shard_columns(table, self.p, "input")
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


# --- the same selection over sharded data: exact, with O(bins + rows of one bin) in the coordinator ---------
BIN_BITS = 16  # each pass splits the current key range into 2**16 bins
MAX_GATHER = 200_000  # rows of the cut bin gathered at once; more, and the bin is split again


def sortable_keys(scores: np.ndarray) -> np.ndarray:
    """float64 scores as uint64 keys in the same order (IEEE-754 bits, sign-flipped)."""
    bits = np.ascontiguousarray(scores, dtype=np.float64).view(np.uint64)
    negative = (bits >> np.uint64(63)).astype(bool)
    return np.where(negative, ~bits, bits | np.uint64(1 << 63))


def _shift(level: int) -> np.uint64:
    return np.uint64(64 - BIN_BITS * (level + 1))


def shard_columns(table: pa.Table, p: ThresholdParams, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, scores, mass)`` of one shard's rows; a NaN score is an error naming the id and ``where``."""
    ids = np.asarray(table.column(schema.ID).to_pylist(), dtype=object)
    scores = table.column(p.column).to_numpy(zero_copy_only=False).astype(np.float64)
    if np.isnan(scores).any():
        raise ValueError(f"score_threshold: column {p.column!r} is NaN for id {ids[np.isnan(scores)][0]!r} ({where})")
    mass = (table.column(schema.N_CHARS).to_numpy(zero_copy_only=False).astype(np.float64)
            if p.weight == "chars" else np.ones(len(ids)))
    return ids, scores, mass


def bin_summary(scores: np.ndarray, mass: np.ndarray, level: int, prefix: int | None) -> dict[int, list[float]]:
    """``{bin: [rows, mass]}`` of the rows whose key lies in bin ``prefix`` of the level above (all at 0)."""
    keys = sortable_keys(scores)
    if prefix is not None:
        inside = (keys >> _shift(level - 1)) == np.uint64(prefix)
        keys, mass = keys[inside], mass[inside]
    bins, inverse = np.unique(keys >> _shift(level), return_inverse=True)
    counts = np.bincount(inverse, minlength=len(bins))
    sums = np.bincount(inverse, weights=mass, minlength=len(bins))
    return {int(b): [int(c), float(m)] for b, c, m in zip(bins, counts, sums, strict=True)}


def merge_summaries(summaries: list[dict[int, list[float]]]) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for s in summaries:
        for b, (c, m) in s.items():
            acc = out.setdefault(b, [0, 0.0])
            acc[0] += c
            acc[1] += m
    return out


@dataclass
class Cut:
    """Where the kept prefix of the ranking ends: everything before bin ``bin`` of ``level``, then part of it.

    ``rows_before``/``mass_before`` count the rows ranked before the bin; ``target`` is the mass (or, when
    ``by_count``, the number of rows) the kept prefix must reach.
    """

    level: int
    bin: int | None
    rows_before: int
    mass_before: float
    target: float
    by_count: bool
    total_rows: int
    total_mass: float


def find_cut(merged: dict[int, list[float]], p: ThresholdParams, level: int, outer: Cut | None) -> Cut:
    """The bin of ``level`` in which the kept prefix ends (bins walked in ranking order)."""
    if outer is None:
        n = sum(c for c, _ in merged.values())
        total = sum(m for _, m in merged.values())
        by_count = total <= 0
        target = math.ceil(p.top_p * n) if by_count else p.top_p * total * (1 - 1e-12)
        outer = Cut(level, None, 0, 0.0, target, by_count, n, total)
    rows, mass = outer.rows_before, outer.mass_before
    for b in sorted(merged, reverse=p.descending):
        c, m = merged[b]
        reached = rows + c >= outer.target if outer.by_count else mass + m >= outer.target
        if reached:
            return Cut(level, b, rows, mass, outer.target, outer.by_count, outer.total_rows, outer.total_mass)
        rows, mass = rows + c, mass + m
    return Cut(level, None, rows, mass, outer.target, outer.by_count, outer.total_rows, outer.total_mass)


def in_cut_bin(scores: np.ndarray, cut: Cut) -> np.ndarray:
    return (sortable_keys(scores) >> _shift(cut.level)) == np.uint64(cut.bin)


def before_cut(scores: np.ndarray, cut: Cut, descending: bool) -> np.ndarray:
    """Rows ranked before the cut bin (all rows when the prefix takes everything)."""
    if cut.bin is None:
        return np.ones(len(scores), dtype=bool)
    bins = sortable_keys(scores) >> _shift(cut.level)
    return bins > np.uint64(cut.bin) if descending else bins < np.uint64(cut.bin)


def select_sharded(p: ThresholdParams, summarize, gather) -> tuple[Selection, Cut]:
    """The selection over sharded data, given two fan-outs over the shards (Ray tasks in the runner).

    Args:
        p: the stage's params.
        summarize: ``summarize(level, prefix) -> [bin_summary of each shard]``.
        gather: ``gather(cut) -> [(ids, scores, mass) of each shard's rows in the cut bin]``.
    """
    cut = None
    for level in range(4):
        merged = merge_summaries(summarize(level, cut.bin if cut else None))
        cut = find_cut(merged, p, level, cut)
        if cut.bin is None or merged[cut.bin][0] <= MAX_GATHER:
            break
    parts = gather(cut) if cut.bin is not None else []
    ids, scores, mass = (np.concatenate([g[i] for g in parts]) if parts else np.array([]) for i in range(3))
    return finish_cut(ids.astype(object), scores.astype(np.float64), mass.astype(np.float64), cut, p), cut


def finish_cut(ids: np.ndarray, scores: np.ndarray, mass: np.ndarray, cut: Cut, p: ThresholdParams) -> Selection:
    """The kept rows of the cut bin (``ids``... gathered from every shard) and the selection's statistics."""
    order = top_p_order(scores, ids, p.descending)
    if cut.by_count:
        n_in = int(max(0, min(len(order), cut.target - cut.rows_before)))
    else:
        cum = cut.mass_before + np.cumsum(mass[order])
        n_in = min(len(order), int(np.searchsorted(cum, cut.target, side="left")) + 1) if len(order) else 0
    kept = order[:n_in]
    kept_docs = cut.rows_before + n_in
    last = scores[kept[-1]] if n_in else None
    return Selection(
        ids=ids[kept].tolist(),
        scores=scores[kept].tolist(),
        stats={
            "column": p.column,
            "threshold": float(last) if last is not None else None,
            "kept_docs": int(kept_docs),
            "total_docs": int(cut.total_rows),
            "kept_mass": float(cut.mass_before + mass[kept].sum()),
            "total_mass": float(cut.total_mass),
            "weight": p.weight,
        },
    )
