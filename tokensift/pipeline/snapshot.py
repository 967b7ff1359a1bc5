"""The snapshot: ``data/train-XXXXX-of-YYYYY.parquet`` shards, ``manifest.json``, ``report/``.

The manifest is the commit point: it is written last, and readers (``tokensift verify``, the loader, the
report) trust only the files it lists. ``datasets.load_dataset("parquet", data_dir=<snapshot>/data)`` reads
a published snapshot. Any location works: a local path or a URI (``s3://...``).
"""

from __future__ import annotations

import hashlib

from tokensift.pipeline import fs
from tokensift.pipeline.publish import MANIFEST


def sha256(path: str, storage=None) -> str:
    """sha256 of a file's bytes, streamed from any filesystem."""
    filesystem, inner = fs.resolve(path, storage)
    h = hashlib.sha256()
    with filesystem.open_input_stream(inner) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify(root: str, storage=None) -> list[str]:
    """Problems found in a snapshot (empty when shard checksums, row counts and file list agree)."""
    root = str(root)
    path = fs.join(root, MANIFEST)
    if not fs.is_file(path, storage):
        return [f"{path}: missing"]
    manifest = fs.read_json(path, storage)
    problems = []
    listed = set()
    for s in manifest["shards"]:
        f = fs.join(root, s["file"])
        listed.add(fs.name(f))
        if not fs.is_file(f, storage):
            problems.append(f"{f}: missing")
            continue
        if sha256(f, storage) != s["sha256"]:
            problems.append(f"{f}: sha256 differs from the manifest")
        rows = fs.parquet_file(f, storage).metadata.num_rows
        if rows != s["rows"]:
            problems.append(f"{f}: {rows} rows, manifest says {s['rows']}")
    data = fs.join(root, "data")
    extra = sorted(fs.name(e.path) for e in fs.listdir(data, storage) if fs.name(e.path) not in listed)
    problems += [f"{fs.join(data, name)}: not in the manifest" for name in extra]
    if sum(s["rows"] for s in manifest["shards"]) != manifest["rows"]:
        problems.append(f"{path}: shard rows do not add up to rows={manifest['rows']}")
    return problems
