"""A map stage that sleeps per batch, so a test can kill a run part-way through (tests only)."""

import time
from dataclasses import dataclass

import pyarrow as pa

from tokensift.pipeline.registry import BUILTIN, register


@dataclass
class SleepParams:
    seconds: float = 0.3


@register("test_sleep", kind="map", params=SleepParams)
class Sleep:
    def __init__(self, params):
        self.seconds = params.seconds

    @classmethod
    def needs(cls, params):
        return ["text"]

    @classmethod
    def adds(cls, params):
        return ["slept"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        time.sleep(self.seconds)
        return batch.append_column("slept", pa.array([self.seconds] * batch.num_rows, pa.float32()))


BUILTIN.setdefault("test_sleep", __name__)
