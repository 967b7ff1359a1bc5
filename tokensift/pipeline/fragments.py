"""Workers write their rows: a segment's last stage writes each batch as fragments of its input shards.

A fragment holds the consecutive rows ``[first, first + n)`` of one shard and is named by them
(``rows-<first>-<n>.parquet``), so a retried or duplicated task writes the same name again and can never add
a second copy of a row. The write is atomic (a temporary name renamed into place on local disks, one PUT on
object stores). What travels back to the driver is one small record per fragment, never the rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tokensift.pipeline import fs

SHARD = "_shard"  # hidden column: input shard index
ROW = "_row"  # hidden column: row index inside the shard (after validation / selection)
TIME_PREFIX = "__t"  # hidden columns: per-row share of each map stage's batch seconds
ROW_GROUP = 8192  # rows per Parquet row group
RECORD = pa.schema([
    ("shard", pa.int32()), ("first", pa.int64()), ("rows", pa.int64()), ("file", pa.string()),
    ("bytes", pa.int64()), ("sha256", pa.string()), ("seconds", pa.string()),
])


def hidden(name: str) -> bool:
    return name in (SHARD, ROW) or name.startswith(TIME_PREFIX)


def fragment_name(first: int, rows: int) -> str:
    return f"rows-{first:012d}-{rows:09d}.parquet"


@dataclass(frozen=True)
class FragmentSink:
    """Writes a batch's rows as fragments under ``<segment>/shard-XXXXX/`` and returns their records.

    Args:
        segment: the segment directory (local path or URI).
        storage: the run's storage options (the filesystem is resolved in the worker).
        compression: Parquet codec of the fragments.
    """

    segment: str
    storage: Any
    compression: str

    def __call__(self, table: pa.Table) -> pa.Table:
        records = []
        shards = table.column(SHARD).to_numpy()
        rows = table.column(ROW).to_numpy()
        # a new fragment wherever the shard changes or the row index does not follow on
        cuts = np.flatnonzero((np.diff(shards) != 0) | (np.diff(rows) != 1)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(rows)], strict=True):
            if hi > lo:
                records.append(self._write(table.slice(lo, hi - lo), int(shards[lo]), int(rows[lo])))
        return pa.Table.from_pylist(records, schema=RECORD)

    def _write(self, part: pa.Table, shard: int, first: int) -> dict:
        seconds = {c: pc.sum(part.column(c)).as_py() for c in part.column_names if c.startswith(TIME_PREFIX)}
        data = part.drop_columns([c for c in part.column_names if hidden(c)])
        sink = pa.BufferOutputStream()
        pq.write_table(data, sink, row_group_size=ROW_GROUP, compression=self.compression)
        blob = sink.getvalue().to_pybytes()
        name = fragment_name(first, part.num_rows)
        fs.write_bytes(fs.join(self.segment, f"shard-{shard:05d}", name), blob, self.storage)
        return {"shard": shard, "first": first, "rows": part.num_rows, "file": name, "bytes": len(blob),
                "sha256": hashlib.sha256(blob).hexdigest(), "seconds": json.dumps(seconds)}


def read_fragments(files: list[str], columns: list[str] | None, storage) -> pa.Table | None:
    """The rows of ``files`` in order (``None`` when there are none); schemas of shards may differ by nulls."""
    tables = [fs.read_table(path, columns, storage) for path in files]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def tiling(fragments: list[dict], rows: int) -> list[dict] | None:
    """Fragments that cover rows ``[0, rows)`` exactly once, in order; ``None`` while a row is missing.

    Retried tasks may have written overlapping fragments (the same rows cut at other batch bounds); any
    exact tiling holds each row once. A breadth-first walk from row 0 finds one.
    """
    starting: dict[int, list[dict]] = {}
    for f in fragments:
        starting.setdefault(f["first"], []).append(f)
    came: dict[int, dict | None] = {0: None}
    frontier = [0]
    while frontier and rows not in came:
        at = frontier.pop(0)
        for f in starting.get(at, []):
            end = at + f["rows"]
            if end <= rows and end not in came:
                came[end] = f
                frontier.append(end)
    if rows not in came:
        return None
    out, at = [], rows
    while at:
        out.append(came[at])
        at = came[at]["first"]
    return out[::-1]
