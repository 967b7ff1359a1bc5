"""A Ray actor collecting per-input-shard source statistics from read tasks."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class Ledger:
    """Rows read, rows skipped by reason, and rows per group value, for each input shard."""

    def __init__(self):
        self.by_shard: dict[int, dict] = {}

    def report(self, shard: int, info: dict) -> None:
        self.by_shard[shard] = info

    def get(self, shard: int) -> dict | None:
        return self.by_shard.get(shard)
