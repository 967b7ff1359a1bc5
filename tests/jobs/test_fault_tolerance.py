"""A Ray worker killed during a run is retried by Ray, and the snapshot still has every document once."""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokensift.config import RunConfig, load
from tokensift.pipeline import runner
from tokensift.pipeline.registry import register


@dataclass
class KillOnceParams:
    """Args:
    marker: file claimed (O_EXCL) by the one actor that kills itself; holds its pid.
    at_call: the actor dies on this call of ``__call__`` (1-based), mid-task, after computing earlier batches.
    """

    marker: str = ""
    at_call: int = 2


@register("test_kill_once", kind="map", params=KillOnceParams)
class KillOnce:
    """Map stage whose first actor to reach call ``at_call`` SIGKILLs its own worker process, once per run."""

    def __init__(self, params: KillOnceParams):
        self.marker, self.at_call, self.calls = params.marker, params.at_call, 0

    @classmethod
    def needs(cls, params):
        return ["id"]

    @classmethod
    def adds(cls, params):
        return ["worker_pid"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        if self.calls == self.at_call:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                fd = None
            if fd is not None:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return batch.append_column("worker_pid", pa.array([os.getpid()] * batch.num_rows, pa.int64()))


# the stage class travels to Ray workers by value: they cannot import this test module
pytest.importorskip("ray").cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_killed_worker_is_retried_and_every_document_is_kept_once(ray_local, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ids = [f"doc-{i:04d}" for i in range(900)]
    for k in range(3):
        part = ids[k * 300 : (k + 1) * 300]
        pq.write_table(pa.table({"id": part, "text": [f"text of {i} " * 3 for i in part]}), src / f"part-{k}.parquet")
    marker = tmp_path / "killed.pid"
    cfg = load(RunConfig, None, [
        f"source.paths=[{src}/*.parquet]",
        f"output.path={tmp_path / 'snap'}",
        "output.report=false",
        "ray.num_cpus=2",
    ])
    cfg.stages = [{"stage": "test_kill_once", "marker": str(marker), "at_call": 2,
                   "resources": {"num_cpus": 0.5, "concurrency": 2, "batch_size": 50}}]

    out = runner.run(cfg)

    assert marker.is_file(), "no actor was killed: the test did not exercise a failure"
    killed = int(marker.read_text())
    table = pq.read_table(out / "data")
    counts = Counter(table.column("id").to_pylist())
    assert set(counts) == set(ids)
    assert max(counts.values()) == 1, [i for i, c in counts.items() if c > 1][:5]
    pids = set(table.column("worker_pid").to_pylist())
    # Ray re-ran the dead actor's whole task elsewhere: nothing it computed before dying was published
    assert killed not in pids
