"""A segment's execution and commits run in one Ray task; the driver only polls for the shard markers.

Ray Data's streaming executor is a loop in the process that iterates the dataset, and it costs CPU for every
block and every second it runs. So the driver hands each segment's dataset to one task (:func:`run_segment`),
pinned to the driver's own node (losing a worker node never takes it down) and reserving no CPU. That task
consumes the fragment records, commits each shard once its fragments tile the shard's rows (the marker file
is the commit) and streams the markers back, a few hundred bytes per shard. The driver polls for them
(:func:`stream_markers`), so its own cost is per shard, not per row or block, and it never imports Ray Data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from tokensift.pipeline import driver_io, fs
from tokensift.pipeline.fragments import tiling


def commit_shard(shard_dir: str, marker_path: str, fragments: list[dict], source: dict, storage) -> dict | None:
    """Write the marker of a shard whose ``fragments`` tile its rows; ``None`` while rows are missing.

    Args:
        shard_dir: the shard's directory (its fragments' names are relative to it).
        marker_path: where the marker goes.
        fragments: records of every fragment written for the shard so far (retries may overlap).
        source: the shard's ``source.json`` (rows, and the read task's statistics).
        storage: the run's storage options.
    """
    source = dict(source)
    tiles = tiling(fragments, source.pop("rows"))
    if tiles is None:
        return None
    seconds: dict[str, float] = {}
    for f in tiles:
        for col, s in json.loads(f["seconds"]).items():
            seconds[col] = seconds.get(col, 0.0) + s
    marker = {
        "rows": sum(f["rows"] for f in tiles),
        "fragments": [{k: f[k] for k in ("file", "first", "rows", "bytes", "sha256")} for f in tiles],
        "seconds": seconds,
        "source": source,
    }
    fs.write_json(marker_path, marker, storage)
    return marker


def run_segment(dataset: Callable[[], Any], shards: dict[int, tuple[str, str]], storage) -> Iterator[list[tuple[int, dict]]]:
    """Ray generator task: build and execute the segment's dataset and commit its shards; yields the
    ``(shard, marker)`` pairs of each block of fragment records that completed shards.

    Args:
        dataset: builds the segment's Ray Data dataset, whose rows are fragment records.
        shards: ``{shard: (its directory, its marker path)}`` of every shard the segment runs.
        storage: the run's storage options.
    """
    fragments: dict[int, list[dict]] = {i: [] for i in shards}
    sources: dict[int, dict] = {}

    def commit(shard: int) -> dict | None:
        shard_dir, marker_path = shards[shard]
        if shard not in sources:  # the read task wrote it before any fragment of the shard
            sources[shard] = fs.read_json(fs.join(shard_dir, "source.json"), storage)
        return commit_shard(shard_dir, marker_path, fragments[shard], sources[shard], storage)

    done: set[int] = set()
    for batch in dataset().iter_batches(batch_size=None, batch_format="pyarrow"):
        committed = []
        for record in batch.to_pylist():
            shard = record["shard"]
            fragments[shard].append(record)
            marker = commit(shard) if shard not in done else None
            if marker is not None:
                done.add(shard)
                committed.append((shard, marker))
        if committed:
            yield committed
    rest = []
    for shard in [i for i in shards if i not in done]:  # shards that produced no rows
        marker = commit(shard)
        if marker is None:
            raise RuntimeError(f"{shards[shard][0]}: the shard ended with rows missing from its fragments")
        rest.append((shard, marker))
    if rest:
        yield rest


def stream_markers(dataset: Callable[[], Any], shards: dict[int, tuple[str, str]], storage, idle: Callable[[], None],
                   poll_seconds: float = 1.0) -> Iterator[tuple[int, dict]]:
    """Run :func:`run_segment` on this node and yield its ``(shard, marker)`` pairs as they come.

    The driver sleeps between polls (a blocking wait costs Ray's client CPU all along) and calls ``idle``
    after each one, e.g. to refresh the work directory's lock.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(run_segment).options(num_cpus=0, max_retries=0, scheduling_strategy=here)
    markers = task.remote(dataset, shards, storage)
    while True:
        ready, _ = ray.wait([markers], timeout=0)
        if not ready:
            idle()
            time.sleep(poll_seconds)
            continue
        try:
            ref = next(markers)
        except StopIteration:
            return
        yield from driver_io.get(ref)
