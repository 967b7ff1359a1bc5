"""One segment of a run on Ray Data: read (source or previous parts), map stages, ordered sink to parts.

A run is split at its select stages: segment 0 reads the source, segment k reads the parts of segment k-1
filtered by select stage k-1. Rows stream through ``map_batches`` actor pools in input order
(``preserve_order``), and the driver cuts the stream at input-shard boundaries into per-shard parts with
completion markers, so an interrupted run resumes shard by shard.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from tokensift.pipeline import schema, sources
from tokensift.pipeline.registry import StageEntry

SHARD = "_shard"  # hidden column: input shard index, dropped before publishing
TIME_PREFIX = "__t"  # hidden columns: per-row share of each map stage's batch seconds


def hidden(name: str) -> bool:
    return name == SHARD or name.startswith(TIME_PREFIX)


class TimedStage:
    """Runs one map stage on an actor and records its compute seconds in a hidden column."""

    def __init__(self, cls: type, params, label: str, column: str):
        self.stage, self.label, self.column = cls(params), label, column

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        out = self.stage(batch)
        seconds = time.perf_counter() - start
        if out.num_rows != batch.num_rows or SHARD not in out.column_names:
            raise RuntimeError(f"{self.label}: a map stage must keep every row and column of its batch")
        return out.append_column(self.column, pa.array(np.full(out.num_rows, seconds / max(out.num_rows, 1))))


_BUILT: dict[tuple, TimedStage] = {}  # stages of task compute, built once per worker process


def run_in_task(block: pa.Table, cls: type, params, label: str, column: str, batch_size: int) -> pa.Table:
    """Ray Data task: run a ``compute: tasks`` stage over ``block`` in batches of ``batch_size`` rows.

    The stage is built on the first call in a worker process and reused by its later tasks. The task is
    called on whole blocks (``batch_size=None``) so that Ray Data fuses it into the read task before it.
    """
    key = (cls, label, column, repr(params))
    if key not in _BUILT:
        if len(_BUILT) >= 4:  # a long-lived worker serving many runs keeps the latest few stages
            _BUILT.pop(next(iter(_BUILT)))
        _BUILT[key] = TimedStage(cls, params, label, column)
    stage = _BUILT[key]
    if block.num_rows <= batch_size:
        return stage(block)
    return pa.concat_tables([stage(block.slice(lo, batch_size)) for lo in range(0, block.num_rows, batch_size)])


def read_shard(shard, src, ledger) -> pa.Table:
    """Read one input shard, validate it, report its statistics to the ledger."""
    import ray

    table = sources.read(shard, src.text_column, src.id_column)
    rows_read = table.num_rows
    table, skipped = sources.validate(table, shard, src.on_invalid, src.max_doc_chars)
    groups = {}
    if src.group_column and src.group_column in table.column_names:
        vc = pc.value_counts(table.column(src.group_column)).to_pylist()
        groups = {str(v["values"]): v["counts"] for v in vc}
    keep = src.keep_columns
    if keep is not None:
        missing = [c for c in keep if c not in table.column_names]
        if missing:
            raise sources.SourceError(f"{shard.path}: no column(s) {', '.join(missing)} (source.keep_columns)")
        table = table.select([schema.ID, schema.TEXT, schema.N_CHARS] + [c for c in keep if c not in (schema.ID, schema.TEXT)])
    ray.get(ledger.report.remote(shard.index, {"rows_read": rows_read, "skipped": skipped, "groups": groups}))
    return table.append_column(SHARD, pa.array(np.full(table.num_rows, shard.index, np.int32)))


def shard_datasource(shards: list, src, ledger):
    """A Ray Data datasource with one read task per input shard.

    A read (unlike a ``map_batches`` over shard indices) is never fused into a downstream actor stage
    that bundles rows up to its ``batch_size``, so shards are read in parallel and stream out one by one.
    """
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class Shards(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            def task(shard):
                meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(shard.path,))
                return ReadTask(lambda: [read_shard(shard, src, ledger)], meta, per_task_row_limit=per_task_row_limit)

            return [task(s) for s in shards]

    return Shards()


def keep_selected(batch: pa.Table, kept_ids: pa.Array, rank_column: str) -> pa.Table:
    """Ray Data task: keep rows whose id was selected, adding their selection rank."""
    pos = pc.index_in(batch.column(schema.ID), value_set=kept_ids)
    mask = pc.is_valid(pos)
    return batch.filter(mask).append_column(rank_column, pc.filter(pos, mask).cast(pa.int64()))


def add_map_stages(ds, entries: list[StageEntry]):
    """Chain the segment's map stages as actor pools or tasks, with their configured resources."""
    import ray.data
    from omegaconf import OmegaConf

    for e in entries:
        r = e.resources
        args = (e.spec.cls, OmegaConf.to_object(e.params), e.label, f"{TIME_PREFIX}{e.index}")
        if r.compute == "tasks":
            ds = ds.map_batches(
                run_in_task,
                fn_args=(*args, r.batch_size),
                batch_size=None,
                batch_format="pyarrow",
                num_cpus=r.num_cpus,
                num_gpus=r.num_gpus,
            )
            continue
        ds = ds.map_batches(
            TimedStage,
            fn_constructor_args=args,
            batch_size=r.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=r.concurrency),
            num_cpus=r.num_cpus,
            num_gpus=r.num_gpus,
        )
    return ds


def read_cpus(entries: list[StageEntry], default: float) -> float:
    """CPUs per read task: a first stage of task compute runs inside the read task, which takes its CPUs."""
    first = entries[0].resources if entries else None
    return first.num_cpus if first is not None and first.compute == "tasks" and not first.num_gpus else default


def stream_to_parts(ds, pending: list[int], write_part, desc: str) -> None:
    """Cut the ordered stream into per-shard tables and hand each complete shard to ``write_part``.

    Shard i is complete when a row of a later shard arrives or the stream ends; shards that produced no
    rows are complete too (``write_part(i, None)``).
    """
    todo = list(pending)
    current, buffer = None, []
    bar = tqdm(total=len(pending), desc=desc, unit="shard")

    def flush_until(shard: int | None):
        nonlocal current, buffer
        while todo and (shard is None or todo[0] < shard):
            done = todo.pop(0)
            write_part(done, pa.concat_tables(buffer) if done == current and buffer else None)
            if done == current:
                current, buffer = None, []
            bar.update(1)

    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if batch.num_rows == 0:
            continue
        ids = batch.column(SHARD).to_numpy()
        if np.any(np.diff(ids) < 0) or (current is not None and ids[0] < current):
            raise RuntimeError("rows arrived out of input order; ray.preserve_order must stay true")
        cuts = np.flatnonzero(np.diff(ids)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(ids)], strict=True):
            shard = int(ids[lo])
            if shard != current:
                flush_until(shard)
                current, buffer = shard, []
            buffer.append(batch.slice(lo, hi - lo))
    flush_until(None)
    bar.close()
