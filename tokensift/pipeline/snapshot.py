"""The snapshot: ``data/train-XXXXX-of-YYYYY.parquet`` shards, ``manifest.json``, ``report/``.

``datasets.load_dataset("parquet", data_dir=<snapshot>/data)`` reads it; ``tokensift verify`` checks it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from tokensift import __version__
from tokensift.pipeline.segments import hidden

MANIFEST = "manifest.json"


def write(final: Path, parts: list[Path], manifest: dict, output, pool: list[Path] | None = None) -> None:
    """Re-cut the ordered parts into ``rows_per_shard`` shards and write the manifest (and report).

    ``pool`` is the scored rows before the last selection, for the report's score histograms.
    """
    data = final / "data"
    data.mkdir(parents=True)
    drop = set(output.drop_columns)
    schemas = [pq.read_schema(p) for p in parts]
    fields = [f for f in pa.unify_schemas(schemas, promote_options="permissive")] if schemas else []
    target = pa.schema([f for f in fields if not hidden(f.name) and f.name not in drop])
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    n_files = max(1, math.ceil(total / output.rows_per_shard))
    names = [data / f"train-{i:05d}-of-{n_files:05d}.parquet" for i in range(n_files)]

    writers, counts, shard = [], [0] * n_files, 0
    writer = pq.ParquetWriter(names[0], target)
    writers.append(writer)
    with tqdm(total=total, desc="write snapshot", unit="row") as bar:
        for p in parts:
            table = _conform(pq.read_table(p), target)
            while table.num_rows:
                room = output.rows_per_shard - counts[shard]
                if room == 0:
                    shard += 1
                    writer = pq.ParquetWriter(names[shard], target)
                    writers.append(writer)
                    continue
                head, table = table.slice(0, room), table.slice(room)
                writer.write_table(head)
                counts[shard] += head.num_rows
                bar.update(head.num_rows)
    for w in writers:
        w.close()
    for path in names[len(writers):]:  # only when parts were empty: keep the declared shard count
        pq.write_table(target.empty_table(), path)

    manifest = {
        "tokensift_version": __version__,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **manifest,
        "rows": total,
        "columns": {f.name: str(f.type) for f in target},
        "shards": [
            {"file": f"data/{n.name}", "rows": c, "bytes": n.stat().st_size, "sha256": sha256(n)}
            for n, c in zip(names, counts, strict=True)
        ],
    }
    (final / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    if output.report:
        from tokensift.pipeline.report import write_report

        write_report(final, pool)


def _conform(table: pa.Table, target: pa.Schema) -> pa.Table:
    """Select and cast the target columns (a part may lack a column only when it is all null)."""
    cols = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in target
    ]
    return pa.table(cols, schema=target)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(root: Path) -> list[str]:
    """Problems found in a snapshot (empty when shard checksums, row counts and file list agree)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        return [f"{path}: missing"]
    manifest = json.loads(path.read_text())
    problems = []
    listed = set()
    for s in manifest["shards"]:
        f = root / s["file"]
        listed.add(f.name)
        if not f.is_file():
            problems.append(f"{f}: missing")
            continue
        if sha256(f) != s["sha256"]:
            problems.append(f"{f}: sha256 differs from the manifest")
        rows = pq.ParquetFile(f).metadata.num_rows
        if rows != s["rows"]:
            problems.append(f"{f}: {rows} rows, manifest says {s['rows']}")
    extra = sorted(p.name for p in (root / "data").glob("*") if p.name not in listed)
    problems += [f"{root / 'data' / name}: not in the manifest" for name in extra]
    if sum(s["rows"] for s in manifest["shards"]) != manifest["rows"]:
        problems.append(f"{path}: shard rows do not add up to rows={manifest['rows']}")
    return problems
