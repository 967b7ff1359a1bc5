"""The stage protocol: map stages add columns batch by batch; select stages pick ids from gathered columns.

A stage is registered by name (``tokensift.pipeline.registry.register``) with a params dataclass, so a
config says ``{stage: votek, budget: 100}``. Map stages run on Ray actors or tasks (``map_batches``,
``batch_format="pyarrow"``); select stages run once over the gathered columns they need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

COMPUTE = ("actors", "tasks")


@dataclass
class Resources:
    """What one worker of a map stage asks Ray for.

    A stage class may set ``default_resources`` (a dict of these fields); the config's ``resources``
    override it field by field.

    Args:
        compute: ``actors``: a pool of ``concurrency`` actors, each loading the stage once (models that
            are slow to load). ``tasks``: Ray tasks, the stage built once per worker process and reused;
            as the first stage of a run it runs inside the read tasks (they take its ``num_cpus``), so
            input blocks never pass through the object store on their way to it (cheap-to-load stages).
        num_cpus: CPUs per actor or task; keep actors fractional on small machines (1 per actor starves
            the read task on 2 CPUs).
        num_gpus: GPUs per actor or task (0 on CPU machines).
        concurrency: actors in the pool (``actors`` only).
        batch_size: rows per call of the stage.
        memory: bytes of memory to reserve per actor or task (select stages gather columns: size it to them);
            ``None`` reserves nothing.
    """

    compute: str = field(default="actors", metadata={"choices": COMPUTE})
    num_cpus: float = field(default=0.5, metadata={"ge": 0})
    num_gpus: float = field(default=0.0, metadata={"ge": 0})
    concurrency: int = field(default=1, metadata={"ge": 1})
    batch_size: int = field(default=256, metadata={"ge": 1})
    memory: int | None = field(default=None, metadata={"gt": 0})


@runtime_checkable
class MapStage(Protocol):
    """Loads its model once in ``__init__(params)``; ``__call__`` returns the batch with columns added.

    Class methods ``needs(params)`` and ``adds(params)`` list the columns read and written; the runner
    checks them before any work starts. A map stage keeps every row and their order.
    """

    def __call__(self, batch: pa.Table) -> pa.Table: ...


@dataclass
class Selection:
    """What a select stage returns.

    Args:
        ids: document ids to keep, in selection order (rank 0 first); no repeats.
        stats: statistics recorded in the manifest (threshold, budget, objective values...).
        scores: optional per-kept-document value (e.g. the marginal gain when picked), same order as ids.
    """

    ids: list[str]
    stats: dict[str, Any] = field(default_factory=dict)
    scores: list[float] | None = None


@runtime_checkable
class SelectStage(Protocol):
    """Sees a ``pa.Table`` with ``id`` and the columns of ``needs(params)`` for every row; returns a Selection."""

    def select(self, table: pa.Table) -> Selection: ...
