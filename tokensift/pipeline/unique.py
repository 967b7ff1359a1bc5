"""Ids are unique in every published snapshot: a distributed check over 64-bit id hashes.

Inside one input shard the read task checks its ids (``sources.check_unique_ids``). Across shards, each read
task also writes its ids' xxh64 hashes, sorted, as ``idhash.bin`` beside its fragments, with the offsets of
``BUCKETS`` hash ranges in its source record. After segment 0, one Ray task per range reads that range of
every shard's file (a ranged read: 8 bytes per row in all), and reports hashes found in two shards; a second
task compares the ids behind such a hash (64-bit hashes can collide over billions of ids). The driver
receives at most a few hashes, and the id and the two files of a real duplicate. Generated ids
(``<file>:<row>``) are unique by construction and not checked.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from tokensift.pipeline import driver_io, fs, schema

BUCKETS = 16  # hash ranges, checked by one task each
HASHES = "idhash.bin"


class DuplicateIdError(ValueError):
    """The same id in two input shards."""


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """xxh64 of every id's UTF-8 bytes."""
    import xxhash

    return np.fromiter((xxhash.xxh64_intdigest(s.encode()) for s in ids.to_pylist()), np.uint64, len(ids))


def write_hashes(ids: pa.ChunkedArray, shard_dir: str, storage) -> list[int]:
    """Write the sorted id hashes of one shard; returns the row offsets of the ``BUCKETS`` ranges."""
    hashes = np.sort(id_hashes(ids))
    fs.write_bytes(fs.join(shard_dir, HASHES), hashes.astype("<u8").tobytes(), storage)
    edges = [np.uint64(b) << np.uint64(64 - 4) for b in range(1, BUCKETS)]  # 16 ranges: the top 4 bits
    return [0, *np.searchsorted(hashes, edges).tolist(), len(hashes)]


def _scan(bucket: int, shards: list[tuple[int, str, list[int]]], storage) -> list[tuple[int, int, int]]:
    """Ray task: hashes of range ``bucket`` present in two shards, as ``(hash, shard, other shard)``."""
    values, owners = [], []
    for shard, path, offsets in shards:
        lo, hi = offsets[bucket], offsets[bucket + 1]
        if hi > lo:
            filesystem, inner = fs.resolve(path, storage)
            with filesystem.open_input_file(inner) as f:
                values.append(np.frombuffer(f.read_at(8 * (hi - lo), 8 * lo), dtype="<u8"))
            owners.append(np.full(hi - lo, shard))
    if not values:
        return []
    v, o = np.concatenate(values), np.concatenate(owners)
    order = np.argsort(v, kind="stable")
    v, o = v[order], o[order]
    same = np.flatnonzero(v[1:] == v[:-1])
    return [(int(v[i]), int(o[i]), int(o[i + 1])) for i in same[:8]]


def _confirm(value: int, files_a: list[str], files_b: list[str], storage) -> str | None:
    """Ray task: the id behind hash ``value`` when the same id is in both shards' fragments, else ``None``."""

    def hits(files: list[str]) -> set[str]:
        out: set[str] = set()
        for path in files:
            ids = fs.read_table(path, [schema.ID], storage).column(schema.ID)
            out.update(ids.take(pa.array(np.flatnonzero(id_hashes(ids) == np.uint64(value)))).to_pylist())
        return out

    common = hits(files_a) & hits(files_b)
    return min(common) if common else None


def check_across_shards(shards: list[tuple[int, str, list[int]]], fragments: dict[int, list[str]], place_of,
                        storage) -> None:
    """Raise :class:`DuplicateIdError` naming an id found in two shards and both places.

    Args:
        shards: ``(shard, its idhash.bin, its bucket offsets)`` of every shard whose ids were given.
        fragments: each shard's committed fragments (for the exact comparison).
        place_of: maps a shard index to the input file it came from (for the message).
        storage: the run's storage options.
    """
    import ray

    if len(shards) < 2:
        return
    scan, confirm = ray.remote(_scan).options(num_cpus=0.5), ray.remote(_confirm).options(num_cpus=0.5)
    candidates = [c for found in driver_io.get([scan.remote(b, shards, storage) for b in range(BUCKETS)]) for c in found]
    for value, a, b in candidates:
        same = driver_io.get(confirm.remote(value, fragments[a], fragments[b], storage))
        if same is not None:
            raise DuplicateIdError(f"duplicate id {same!r} (column 'id') in {place_of(a)} and {place_of(b)}")
