"""A map stage that holds chosen rows back, so a test can kill a run part-way through (tests only).

While the file ``gate`` exists, a batch holding any id listed in it waits until the file is removed:
the shards before those rows complete, the later ones cannot, on a machine of any speed.
"""

import os
import time
from dataclasses import dataclass

import pyarrow as pa

from tokensift.pipeline.registry import BUILTIN, register


@dataclass
class GateParams:
    gate: str = ""


@register("test_gate", kind="map", params=GateParams)
class Gate:
    def __init__(self, params):
        self.gate = params.gate

    @classmethod
    def needs(cls, params):
        return ["id"]

    @classmethod
    def adds(cls, params):
        return ["gated"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.gate and os.path.exists(self.gate) and self._holds(batch):
            while os.path.exists(self.gate):
                time.sleep(0.1)
        return batch.append_column("gated", pa.array([True] * batch.num_rows))

    def _holds(self, batch: pa.Table) -> bool:
        with open(self.gate) as f:
            ids = set(f.read().split("\n"))
        return any(i in ids for i in batch.column("id").to_pylist())


BUILTIN.setdefault("test_gate", __name__)
