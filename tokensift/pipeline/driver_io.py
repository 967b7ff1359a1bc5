"""What the driver receives, counted: the bytes of every Ray result, record batch and metadata file it reads.

The driver coordinates and the workers move the data, so this stays O(shards + fragments), never O(rows);
each run records it in its manifest (``driver``) and the bench reports it per million documents.
"""

from __future__ import annotations

import json
import pickle
import time
from typing import Any

from tokensift.pipeline import fs


class DriverIO:
    """Bytes received and CPU seconds spent by this process since the counter started: all its threads
    (``cpu_seconds``), and the calling thread alone (``main_thread_cpu_seconds``: tokensift's own driver work;
    the rest is Ray's client threads, which cost CPU per second connected rather than per row)."""

    received = 0

    def __init__(self):
        DriverIO.received = 0
        self.cpu0, self.thread0 = time.process_time(), time.thread_time()

    def summary(self) -> dict:
        return {"cpu_seconds": round(time.process_time() - self.cpu0, 3),
                "main_thread_cpu_seconds": round(time.thread_time() - self.thread0, 3),
                "bytes_received": DriverIO.received}


def get(refs) -> Any:
    """``ray.get`` that counts the bytes of the results, and waits by polling: a blocking wait keeps Ray's
    client threads busy (about 1.5% of a core against 0.5% for a poll every half second)."""
    import ray

    pending, pause = list(refs) if isinstance(refs, list) else [refs], 0.01
    while ray.wait(pending, num_returns=len(pending), timeout=0)[1]:
        time.sleep(pause)
        pause = min(2 * pause, 0.5)
    values = ray.get(refs)
    DriverIO.received += len(pickle.dumps(values, protocol=pickle.HIGHEST_PROTOCOL))
    return values


def read_json(path: str, storage=None) -> Any:
    data = fs.read_bytes(path, storage)
    DriverIO.received += len(data)
    return json.loads(data)
