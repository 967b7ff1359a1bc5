"""Publish a snapshot: Ray tasks re-cut the committed fragments into ``data/train-XXXXX-of-YYYYY.parquet``;
the driver writes only ``manifest.json``, last.

The driver plans from the shard markers alone (rows per fragment): output file ``i`` holds rows
``[i * rows_per_shard, (i + 1) * rows_per_shard)`` of the run's order (input shards in order, rows in input
order), so a resumed run publishes byte-identical files. Each file is written by one task, which reads its
slices of the fragments, writes the file compressed and returns its record (rows, bytes, sha256, rows and
tokens of each row group). Local outputs are assembled in the work directory and renamed into place; on
object stores the manifest is the commit point: readers trust only the files it lists.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tokensift import __version__
from tokensift.pipeline import driver_io, fs, schema
from tokensift.pipeline.fragments import ROW_GROUP

MANIFEST = "manifest.json"


def target_schema(files: list[str], drop: list[str], storage) -> pa.Schema:
    """Ray task: the unified schema of every fragment, less the dropped columns."""
    schemas = [fs.parquet_file(path, storage).schema_arrow for path in files]
    fields = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    return pa.schema([f for f in fields if f.name not in set(drop)])


def plan(fragments: list[tuple[str, int]], rows_per_file: int) -> list[list[tuple[str, int, int]]]:
    """Slices ``(fragment, offset, length)`` of each output file, from the fragments' row counts in order."""
    total = sum(n for _, n in fragments)
    files: list[list[tuple[str, int, int]]] = [[] for _ in range(max(1, math.ceil(total / rows_per_file)))]
    at = 0
    for path, n in fragments:
        offset = 0
        while offset < n:
            i = at // rows_per_file
            take = min(n - offset, (i + 1) * rows_per_file - at)
            files[i].append((path, offset, take))
            offset, at = offset + take, at + take
    return files


def write_file(slices: list[tuple[str, int, int]], target: pa.Schema, path: str, storage) -> dict:
    """Ray task: one snapshot file from its fragment slices; returns its record for the manifest."""
    parts = []
    for frag, offset, length in slices:
        parts.append(conform(fs.read_table(frag, None, storage).slice(offset, length), target))
    table = pa.concat_tables(parts) if parts else target.empty_table()
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=ROW_GROUP, compression="zstd")
    blob = sink.getvalue().to_pybytes()
    fs.write_bytes(path, blob, storage)
    groups = [{"rows": min(ROW_GROUP, table.num_rows - lo)} for lo in range(0, table.num_rows, ROW_GROUP)]
    if schema.INPUT_IDS in table.column_names:
        for g, lo in zip(groups, range(0, table.num_rows, ROW_GROUP), strict=True):
            ids = table.column(schema.INPUT_IDS).slice(lo, g["rows"])
            g["tokens"] = int(pc.sum(pc.list_value_length(ids)).as_py() or 0)
    return {"rows": table.num_rows, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), "row_groups": groups}


def conform(table: pa.Table, target: pa.Schema) -> pa.Table:
    """Select and cast the target columns (a fragment may lack a column only when it is all null)."""
    cols = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in target
    ]
    return pa.table(cols, schema=target)


def publish_data(fragments: list[tuple[str, int]], root: str, output, storage) -> tuple[list[dict], pa.Schema]:
    """Write ``<root>/data/*.parquet`` with Ray tasks; returns the shard records and the schema."""
    import ray

    target = driver_io.get(ray.remote(target_schema).remote([f for f, _ in fragments], list(output.drop_columns), storage))
    slices = plan(fragments, output.rows_per_shard)
    names = [f"data/train-{i:05d}-of-{len(slices):05d}.parquet" for i in range(len(slices))]
    task = ray.remote(write_file).options(num_cpus=1)
    records = driver_io.get([task.remote(s, target, fs.join(root, n), storage) for s, n in zip(slices, names, strict=True)])
    return [dict(file=n, **r) for n, r in zip(names, records, strict=True)], target


def manifest(run: dict, shards: list[dict], target: pa.Schema) -> dict:
    return {
        "tokensift_version": __version__,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **run,
        "rows": sum(s["rows"] for s in shards),
        "columns": {f.name: str(f.type) for f in target},
        "shards": shards,
    }
