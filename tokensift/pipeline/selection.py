"""Select stages at scale: they run in Ray tasks with resources from config, never in the driver.

``score_threshold`` runs as a distributed two-pass (per-shard key histograms, then the rows of the one bin
holding the cut: see ``tokensift.selectors.threshold``), coordinated by a task that holds O(bins + rows of
one bin); the driver receives only its report and key rule. Every
other select stage runs in one Ray task that reads the columns it needs from the committed fragments, selects,
checks the ids and writes ``select<k>.parquet`` itself. The kept ids then reach the read tasks of the next
segment once, as an object reference (:class:`Keep`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import OmegaConf

from tokensift.pipeline import driver_io, fs, schema
from tokensift.pipeline.fragments import read_fragments
from tokensift.pipeline.registry import StageEntry
from tokensift.selectors import threshold


@dataclass(frozen=True)
class Keep:
    """Which rows a select stage kept, applied by the read tasks of the next segment.

    Args:
        ids: object reference to the kept ids (``pa.Array``): in rank order for ranked stages, the kept rows of
            the cut bin for ``score_threshold``.
        rank_column: the rank column to add (ranked stages), else ``None``.
        rule: ``score_threshold``'s cut (``column``, ``level``, ``bin``, ``descending``): rows ranked before
            the cut bin are kept by their score alone.
    """

    ids: Any
    rank_column: str | None
    rule: dict | None = None

    def apply(self, table: pa.Table) -> pa.Table:
        import ray

        kept = ray.get(self.ids)
        pos = pc.index_in(table.column(schema.ID), value_set=kept)
        mask = pc.is_valid(pos)
        if self.rule is not None:
            cut = threshold.Cut(self.rule["level"], self.rule["bin"], 0, 0.0, 0.0, False, 0, 0.0)
            scores = table.column(self.rule["column"]).to_numpy(zero_copy_only=False).astype(np.float64)
            mask = pc.or_(mask, pa.array(threshold.before_cut(scores, cut, self.rule["descending"])))
        out = table.filter(mask)
        return out.append_column(self.rank_column, pc.filter(pos, mask).cast(pa.int64())) if self.rank_column else out


def _load_ids(path: str, storage) -> pa.Array:
    return fs.read_table(path, [schema.ID], storage).column(schema.ID).combine_chunks()


def _write_selection(path: str, ids: list, scores: list | None, storage) -> None:
    scores = scores if scores is not None else [None] * len(ids)
    table = pa.table({schema.ID: pa.array(ids, pa.string()), "score": pa.array(scores, pa.float64())})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    fs.write_bytes(path, sink.getvalue().to_pybytes(), storage)


def _gathered_select(cls: type, params, label: str, files: list[str], columns: list[str], out: str, storage) -> dict:
    """Ray task: gather the columns a select stage needs, select, check the ids, write the selection."""
    table = read_fragments(files, columns, storage)
    start = time.perf_counter()
    selection = cls(params).select(table) if table is not None else None
    seconds = time.perf_counter() - start
    ids = selection.ids if selection else []
    if len(set(ids)) != len(ids):
        seen: set = set()
        repeated = next(i for i in ids if i in seen or seen.add(i))
        raise RuntimeError(f"{label} returned the id {repeated!r} more than once")
    if table is not None and ids:
        known = pc.is_in(pa.array(ids, pa.string()), value_set=table.column(schema.ID).combine_chunks())
        if not pc.all(known).as_py():
            raise RuntimeError(f"{label} returned id(s) not in its input, e.g. {ids[pc.index(known, False).as_py()]!r}")
    _write_selection(out, ids, selection.scores if selection else None, storage)
    return {"rows_in": 0 if table is None else table.num_rows, "rows_out": len(ids), "seconds": round(seconds, 3),
            "stats": selection.stats if selection else {}}


def _shard_summary(files: list[str], p, level: int, prefix: int | None, storage) -> dict:
    """Ray task: one shard's ``{bin: [rows, mass]}`` for score_threshold."""
    table = read_fragments(files, threshold.ScoreThreshold.needs(p) + [schema.ID], storage)
    if table is None:
        return {}
    _, scores, mass = threshold.shard_columns(table, p, files[0])
    return threshold.bin_summary(scores, mass, level, prefix)


def _shard_bin_rows(files: list[str], p, cut, storage) -> tuple:
    """Ray task: one shard's rows ``(ids, scores, mass)`` inside the cut bin."""
    table = read_fragments(files, threshold.ScoreThreshold.needs(p) + [schema.ID], storage)
    if table is None:
        return np.array([], dtype=object), np.array([]), np.array([])
    ids, scores, mass = threshold.shard_columns(table, p, files[0])
    inside = threshold.in_cut_bin(scores, cut)
    return ids[inside], scores[inside], mass[inside]


def run_select(e: StageEntry, files: list[list[str]], out: str, storage) -> tuple[dict, Keep]:
    """Run select stage ``e`` over the committed fragments ``files`` (one list per shard).

    Returns its report (``rows_in``, ``rows_out``, ``seconds``, ``stats``) and the :class:`Keep` that the
    next segment's read tasks apply. Writes the selection to ``out``.
    """
    import ray

    r = e.resources
    opts = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, **({"memory": r.memory} if r.memory else {})}
    params = OmegaConf.to_object(e.params)
    start = time.perf_counter()
    if e.spec.cls is threshold.ScoreThreshold:  # its coordinator is a task too: the cut bin's rows go there
        task = ray.remote(_threshold).options(num_cpus=0)
        report, rule = driver_io.get(task.remote(params, files, out, storage, opts))
    else:
        columns = [schema.ID] + [c for c in e.spec.needs(e.params) if c != schema.ID]
        task = ray.remote(_gathered_select).options(**opts)
        report = driver_io.get(task.remote(e.spec.cls, params, e.label, [f for s in files for f in s], columns, out, storage))
        rule = None
    report["seconds"] = round(time.perf_counter() - start, 3)
    ranked = getattr(e.spec.cls, "ranked", True)
    return report, keep_of(out, schema.rank_column(e.spec.name) if ranked else None, rule, storage)


def keep_of(path: str, rank_column: str | None, rule: dict | None, storage) -> Keep:
    """The :class:`Keep` of a written selection; its ids are loaded by a Ray task, not by the driver."""
    import ray

    return Keep(ray.remote(_load_ids).options(num_cpus=0).remote(path, storage), rank_column, rule)


def _threshold(p, files: list[list[str]], out: str, storage, opts: dict) -> tuple[dict, dict]:
    """Ray task: score_threshold's two-pass over the shards, each pass a Ray task per shard; returns the
    report and the key rule the next segment's read tasks apply."""
    import ray

    summary, rows = ray.remote(_shard_summary).options(**opts), ray.remote(_shard_bin_rows).options(**opts)
    shards = [f for f in files if f]
    selection, cut = threshold.select_sharded(
        p,
        lambda level, prefix: ray.get([summary.remote(f, p, level, prefix, storage) for f in shards]),
        lambda cut: ray.get([rows.remote(f, p, cut, storage) for f in shards]),
    )
    _write_selection(out, selection.ids, selection.scores, storage)
    report = {"rows_in": cut.total_rows, "rows_out": selection.stats["kept_docs"], "stats": selection.stats}
    rule = {"column": p.column, "level": cut.level, "bin": cut.bin, "descending": p.descending}
    return report, rule
