"""Manifest entries of Parquet shards, and adopting a directory of Parquet shards as a snapshot.

A shard's entry is what the loader and ``tokensift verify`` check it against: ``{"file", "rows", "bytes",
"sha256", "row_groups": [{"rows", "tokens"}, ...]}`` (``tokens``: ``input_ids`` per row group, present when
the shard has that column), so a loader needs no up-front read of the token columns.
"""

from __future__ import annotations

import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tokensift.pipeline import fs
from tokensift.pipeline.publish import MANIFEST
from tokensift.pipeline.schema import INPUT_IDS
from tokensift.pipeline.snapshot import sha256

DATA = "data"


def shard_entry(root: str, file: str, storage=None) -> dict:
    """The manifest entry of shard ``root/file`` (``file`` relative to the snapshot root, ``/``-separated)."""
    path = fs.join(str(root), file)
    filesystem, inner = fs.resolve(path, storage)
    with filesystem.open_input_file(inner) as handle:
        f = pq.ParquetFile(handle)
        meta = f.metadata
        entry = {"file": file, "rows": meta.num_rows, "bytes": filesystem.get_file_info(inner).size,
                 "sha256": sha256(path, storage)}
        if INPUT_IDS in f.schema_arrow.names:
            entry["row_groups"] = [
                {"rows": meta.row_group(j).num_rows,
                 "tokens": int(pc.sum(pc.list_value_length(f.read_row_group(j, columns=[INPUT_IDS]).column(0))).as_py() or 0)}
                for j in range(meta.num_row_groups)
            ]
    return entry


def write_manifest(snapshot: str, storage=None, **fields) -> dict:
    """Adopt the Parquet files ``<snapshot>/data/*.parquet`` (written by other tools) as a snapshot.

    Writes ``<snapshot>/manifest.json`` listing every shard as it is now, so the loader and ``tokensift
    verify`` can tell later whether one went missing or changed. Returns the manifest.

    Args:
        snapshot: the directory (local path or URI) holding ``data/``.
        storage: storage options for URIs.
        fields: more top-level manifest fields (e.g. ``tokenizer``).
    """
    files = [e for e in fs.listdir(fs.join(str(snapshot), DATA), storage)
             if e.type == pafs.FileType.File and e.base_name.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"{fs.join(str(snapshot), DATA)}: no parquet shards")
    shards = [shard_entry(snapshot, f"{DATA}/{e.base_name}", storage) for e in files]
    manifest = {**fields, "rows": sum(s["rows"] for s in shards), "shards": shards}
    fs.write_json(fs.join(str(snapshot), MANIFEST), manifest, storage)
    return manifest
