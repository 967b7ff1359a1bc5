"""One segment of a run on Ray Data: read shards, run the map stages, workers write the fragments.

A run is split at its select stages: segment 0 reads the source, segment k reads the committed fragments of
segment k-1 filtered by select stage k-1. Each input shard is read by one Ray read task, which tags its
rows with the shard index and their row index (hidden columns) and writes the shard's source record. The
segment's last stage writes its output rows as fragments straight to the work directory
(:class:`~tokensift.pipeline.fragments.FragmentSink`) and passes on only one small record per fragment to the
segment's commit task (:mod:`tokensift.pipeline.commit`), so no row reaches the driver and no global
ordering of the stream is needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tokensift.pipeline import fs, schema, sources, unique
from tokensift.pipeline.fragments import ROW, SHARD, TIME_PREFIX, FragmentSink, read_fragments
from tokensift.pipeline.registry import StageEntry


class TimedStage:
    """Runs one map stage and records its compute seconds in a hidden column; the last stage also writes."""

    def __init__(self, cls: type, params, label: str, column: str, sink: FragmentSink | None = None):
        self.stage, self.label, self.column, self.sink = cls(params), label, column, sink

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        out = self.stage(batch)
        seconds = time.perf_counter() - start
        if out.num_rows != batch.num_rows or SHARD not in out.column_names or ROW not in out.column_names:
            raise RuntimeError(f"{self.label}: a map stage must keep every row and column of its batch")
        out = out.append_column(self.column, pa.array(np.full(out.num_rows, seconds / max(out.num_rows, 1))))
        return self.sink(out) if self.sink is not None else out


_BUILT: dict[tuple, TimedStage] = {}  # stages of task compute, built once per worker process


def run_in_task(block: pa.Table, cls: type, params, label: str, column: str, batch_size: int,
                sink: FragmentSink | None) -> pa.Table:
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
    out = pa.concat_tables([stage(block.slice(lo, batch_size)) for lo in range(0, max(block.num_rows, 1), batch_size)])
    return sink(out) if sink is not None else out


def with_position(table: pa.Table, shard: int) -> pa.Table:
    """Tag rows with their shard and their row index inside it (hidden columns, dropped on write)."""
    return table.append_column(SHARD, pa.array(np.full(table.num_rows, shard, np.int32))).append_column(
        ROW, pa.array(np.arange(table.num_rows, dtype=np.int64)))


def read_source_shard(shard: sources.InputShard, src, segment: str, storage, content_hash: bool) -> pa.Table:
    """Read task of segment 0: read and validate one input shard, write its source record, tag positions."""
    table = sources.read(shard, src.text_column, src.id_column, storage)
    rows_read, ids_given = table.num_rows, table.schema.metadata[sources.IDS_KEY] == b"given"
    table, skipped = sources.validate(table, shard, src.on_invalid, src.max_doc_chars)
    sources.check_unique_ids(table, shard)
    groups = {}
    if src.group_column and src.group_column in table.column_names:
        groups = {str(v["values"]): v["counts"] for v in pc.value_counts(table.column(src.group_column)).to_pylist()}
    keep = src.keep_columns
    if keep is not None:
        missing = [c for c in keep if c not in table.column_names]
        if missing:
            raise sources.SourceError(f"{shard.path}: no column(s) {', '.join(missing)} (source.keep_columns)")
        table = table.select([schema.ID, schema.TEXT, schema.N_CHARS] + [c for c in keep if c not in (schema.ID, schema.TEXT)])
    record = {"rows": table.num_rows, "rows_read": rows_read, "skipped": skipped, "groups": groups}
    if content_hash:
        record["sha256"] = sources.content_sha256(shard, storage)
    shard_dir = fs.join(segment, f"shard-{shard.index:05d}")
    if ids_given:
        record["id_hash_offsets"] = unique.write_hashes(table.column(schema.ID), shard_dir, storage)
    fs.write_json(fs.join(shard_dir, "source.json"), record, storage)
    return with_position(table, shard.index)


def read_kept_rows(shard: int, files: list[str], keep, segment: str, storage) -> pa.Table:
    """Read task of segment k > 0: the shard's committed fragments of segment k-1, filtered by ``keep``."""
    table = read_fragments(files, None, storage)
    table = keep.apply(table) if table is not None else pa.table({schema.ID: pa.array([], pa.string())})
    fs.write_json(fs.join(segment, f"shard-{shard:05d}", "source.json"), {"rows": table.num_rows}, storage)
    return with_position(table, shard)


def shard_reads(reads: list[tuple[Callable[[], pa.Table], str]]):
    """A Ray Data datasource with one read task per shard: ``(read function, file it reads)``.

    A read (unlike a ``map_batches`` over shard indices) is never fused into a downstream actor stage that
    bundles rows up to its ``batch_size``, so shards are read in parallel.
    """
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class Shards(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            def task(fn, path):
                meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(path,))
                return ReadTask(lambda: [fn()], meta, per_task_row_limit=per_task_row_limit)

            return [task(fn, path) for fn, path in reads]

    return Shards()


def add_map_stages(ds, entries: list[StageEntry], sink: FragmentSink, read_cpus: float):
    """Chain the segment's map stages as actor pools or tasks; the last one writes through ``sink``."""
    import ray.data
    from omegaconf import OmegaConf

    if not entries:  # a segment without map stages: the write runs inside the read task
        return ds.map_batches(sink, batch_size=None, batch_format="pyarrow", num_cpus=read_cpus)
    for i, e in enumerate(entries):
        r = e.resources
        last = sink if i == len(entries) - 1 else None
        args = (e.spec.cls, OmegaConf.to_object(e.params), e.label, f"{TIME_PREFIX}{e.index}")
        if r.compute == "tasks":
            ds = ds.map_batches(run_in_task, fn_args=(*args, r.batch_size, last), batch_size=None,
                                batch_format="pyarrow", num_cpus=r.num_cpus, num_gpus=r.num_gpus)
            continue
        ds = ds.map_batches(TimedStage, fn_constructor_args=(*args, last), batch_size=r.batch_size,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=r.concurrency),
                            num_cpus=r.num_cpus, num_gpus=r.num_gpus)
    return ds


def read_cpus(entries: list[StageEntry], default: float) -> float:
    """CPUs per read task: a first stage of task compute runs inside the read task, which takes its CPUs."""
    first = entries[0].resources if entries else None
    return first.num_cpus if first is not None and first.compute == "tasks" and not first.num_gpus else default


def segment_dataset(reads: list[tuple[Callable[[], pa.Table], str]], maps: list[StageEntry], sink: FragmentSink,
                    read_num_cpus: float, target_block_bytes: int):
    """The segment's Ray Data dataset (built where it runs, in the segment's task): one read task per shard,
    then the map stages, the last one writing through ``sink``; its rows are the fragment records."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = False  # fragments carry their rows' positions
    context.enable_progress_bars = context.enable_operator_progress_bars = False  # tokensift draws its own
    context.print_on_execution_start = False
    context.target_max_block_size = target_block_bytes
    cpus = read_cpus(maps, read_num_cpus)
    ds = ray.data.read_datasource(shard_reads(reads), override_num_blocks=len(reads), num_cpus=cpus)
    return add_map_stages(ds, maps, sink, cpus)
