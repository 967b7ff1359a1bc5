"""The resource plan of a run, checked against the cluster before any work starts.

Ray Data starts a map stage's whole actor pool and keeps it for the segment: ``concurrency`` actors of
``num_cpus`` CPUs and ``num_gpus`` GPUs each, for every actor stage of the segment at once. Read tasks and
task-compute stages run in what the pools leave. When the pools take every CPU, the read task waits
forever and the run hangs with its workers idle; :func:`check_plan` turns that into a ``ConfigError``
saying what to change.
"""

from __future__ import annotations

from tokensift.config import ConfigError
from tokensift.pipeline.registry import StageEntry
from tokensift.pipeline.segments import read_cpus as first_read_cpus

EPS = 1e-6
LATER_READ_CPUS = 1.0  # Ray Data's default for the read + filter task of segments after a select stage


def map_segments(entries: list[StageEntry]) -> list[list[StageEntry]]:
    """The map stages of each segment: a run is cut at its select stages."""
    out: list[list[StageEntry]] = [[]]
    for e in entries:
        if e.spec.kind == "select":
            out.append([])
        else:
            out[-1].append(e)
    return out


def check_plan(entries: list[StageEntry], read_cpus: float, cluster: dict, later_read_cpus: float = LATER_READ_CPUS) -> None:
    """Raise ``ConfigError`` when a segment's actor pools leave no room for its read task or task stages.

    Args:
        entries: the run's stages (``registry.resolve``).
        read_cpus: CPUs per read task of the first segment (``source.read_num_cpus``); a first stage of
            task compute runs inside the read task and takes its own ``num_cpus`` instead.
        cluster: ``ray.cluster_resources()`` (``CPU`` and ``GPU`` totals).
        later_read_cpus: CPUs of the read task of segments after a select stage.
    """
    total = {"num_cpus": float(cluster.get("CPU", 0)), "num_gpus": float(cluster.get("GPU", 0))}
    for seg, maps in enumerate(map_segments(entries)):
        if not maps and seg > 0:
            continue  # a trailing select filters the parts without a Ray pass
        pools = [e for e in maps if e.resources.compute == "actors"]
        tasks = [e for e in maps if e.resources.compute == "tasks"]
        read = first_read_cpus(maps, read_cpus) if seg == 0 else later_read_cpus
        if seg == 0 and tasks and tasks[0] is maps[0] and not maps[0].resources.num_gpus:
            tasks = tasks[1:]  # runs inside the read task, which holds its CPUs
        for key in ("num_gpus", "num_cpus"):
            _check(key, total[key], pools, [("the read task", read if key == "num_cpus" else 0.0)] + [
                (f"{e.label} (tasks)", getattr(e.resources, key)) for e in tasks
            ])


def _check(key: str, total: float, pools: list[StageEntry], needs: list[tuple[str, float]]) -> None:
    """The pools' ``key`` resource plus the largest task's must fit in ``total``."""
    unit = "CPU" if key == "num_cpus" else "GPU"
    taken = sum(e.resources.concurrency * getattr(e.resources, key) for e in pools)
    who, most = max(needs, key=lambda n: n[1])
    if taken + most <= total + EPS:
        return
    if unit == "GPU" and total <= EPS:
        asking = [label for label, n in needs if n > EPS] + [e.label for e in pools if e.resources.num_gpus > EPS]
        raise ConfigError(f"{', '.join(asking)}: resources.num_gpus > 0 but the cluster has no GPUs: set "
                          f"resources.num_gpus=0 and the stage's device to cpu, or run on a cluster with GPUs")
    if not pools:
        raise ConfigError(f"{who} needs {_n(most)} {unit}s but the cluster has {_n(total)}: set its resources.{key} lower "
                          f"or run on a cluster with more {unit}s")
    if taken > total + EPS:
        what = f"need {_n(taken)} {unit}s; the cluster has {_n(total)}"
    elif taken >= total - EPS:
        what = f"take all {_n(total)} {unit}s"
    else:
        what = f"take {_n(taken)} of the cluster's {_n(total)} {unit}s"
    after = f"; {who} needs {_n(most)}" if most > EPS else ""
    raise ConfigError(f"{_describe(pools, key, unit)} {what}{after}: {_fix(pools, key, total, most)}")


def _n(x: float) -> str:
    return f"{x:g}"


def _describe(pools: list[StageEntry], key: str, unit: str) -> str:
    parts = []
    for e in pools:
        r = e.resources
        parts.append(f"{e.label}: {r.concurrency} actor{'s' if r.concurrency > 1 else ''} x {_n(getattr(r, key))} {unit}")
    return ", ".join(parts)


def _fix(pools: list[StageEntry], key: str, total: float, reserve: float) -> str:
    """A change to the largest pool that makes the segment fit (or a larger cluster when none does)."""
    big = max(pools, key=lambda e: e.resources.concurrency * getattr(e.resources, key))
    r = big.resources
    others = sum(e.resources.concurrency * getattr(e.resources, key) for e in pools if e is not big)
    room = total - reserve - others
    hints = []
    if room > EPS:
        each = int(room / r.concurrency * 100) / 100  # rounded down to 0.01 so that the sum fits
        if each > 0:
            hints.append(f"resources.{key}={_n(each)}")
        fewer = int(room / getattr(r, key) + EPS) if getattr(r, key) else r.concurrency
        if 1 <= fewer < r.concurrency:
            hints.append(f"concurrency={fewer}")
    where = f"set {big.label} " + " or ".join(hints) if hints else "shrink the other stages' pools"
    more = "ray.num_cpus or a larger cluster" if key == "num_cpus" else "a cluster with more GPUs"
    return f"{where} (or give Ray more: {more})"
