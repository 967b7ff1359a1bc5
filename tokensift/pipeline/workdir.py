"""The work directory of a run, ``<out>.partial`` beside the output, on any filesystem.

Layout::

    run.json                               inputs fingerprint (a resume must match it)
    lock.json                              the run holding this output location (one at a time)
    seg0/fingerprint.json                  the config that segment 0's parts were made with
    seg0/shard-00003/source.json           written by shard 3's read task: rows, skipped, groups, sha256
    seg0/shard-00003/rows-<first>-<n>.parquet   a fragment: rows [first, first+n) of shard 3, written by
                                           the worker that ran the segment's last stage on them
    seg0/shard-00003.json                  the commit marker: the fragments that tile the shard, rows,
                                           stage seconds, source statistics
    select0.parquet / select0.json         what select stage 0 kept, and its report
    final/                                 (local outputs) the snapshot being assembled

A marker exists only for a complete shard, and only what a marker lists is ever read: fragments of a retried
or duplicated task that no marker lists are garbage that the next run removes. Workers write the fragments
and the source records, each segment's commit task writes the markers, and the driver writes only the small
JSON files of the run (run, lock, fingerprints, selections).
"""

from __future__ import annotations

import os
import socket
import time
import uuid

from tokensift.pipeline import driver_io, fs

STALE_LOCK_SECONDS = 600  # a lock of another host not refreshed for this long is taken over


class LockedError(RuntimeError):
    """Another run holds the output location."""


class WorkDir:
    """The ``<out>.partial`` directory of one run.

    Args:
        out: the snapshot location (local path or URI).
        inputs_fingerprint: what a resumed run must share with the interrupted one (the inputs).
        storage: the run's ``storage`` options.
        restart: discard an interrupted run's work first.
    """

    def __init__(self, out: str, inputs_fingerprint: str, storage=None, restart: bool = False):
        self.out, self.storage = out, storage
        self.root = f"{out.rstrip('/')}.partial"
        self.run_id = uuid.uuid4().hex
        self.lock()
        if restart:
            self.clear()
        run = self.path("run.json")
        if fs.is_file(run, storage):
            if fs.read_json(run, storage)["inputs"] != inputs_fingerprint:
                self.unlock()
                raise FileExistsError(
                    f"{self.root} holds an interrupted run over different inputs (a file changed, was added "
                    "or removed); pass --restart to discard it"
                )
        else:
            fs.write_json(run, {"inputs": inputs_fingerprint}, storage)

    def path(self, *parts: str) -> str:
        return fs.join(self.root, *parts)

    # --- one run per output location -------------------------------------------------------------
    def lock(self) -> None:
        """Take ``lock.json``; a live holder is an error naming it, a dead or stale one is taken over."""
        path = self.path("lock.json")
        if fs.is_file(path, self.storage):
            holder = fs.read_json(path, self.storage)
            if _alive(holder):
                raise LockedError(
                    f"{self.out} is in use by another run (pid {holder['pid']} on {holder['host']}, since "
                    f"{holder['since']}); wait for it, or remove {path} if that run is gone"
                )
        me = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": self.run_id,
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "heartbeat": time.time()}
        fs.write_json(path, me, self.storage)
        if fs.read_json(path, self.storage).get("run_id") != self.run_id:  # lost a race to another run
            raise LockedError(f"{self.out} was just taken by another run ({path})")

    def heartbeat(self) -> None:
        path = self.path("lock.json")
        holder = fs.read_json(path, self.storage)
        if holder.get("run_id") == self.run_id:
            fs.write_json(path, dict(holder, heartbeat=time.time()), self.storage)

    def unlock(self) -> None:
        path = self.path("lock.json")
        if fs.is_file(path, self.storage) and fs.read_json(path, self.storage).get("run_id") == self.run_id:
            fs.delete(path, self.storage)

    # --- segments, shards, fragments --------------------------------------------------------------
    def segment(self, seg: int) -> str:
        return self.path(f"seg{seg}")

    def shard_dir(self, seg: int, shard: int) -> str:
        return self.path(f"seg{seg}", f"shard-{shard:05d}")

    def marker_path(self, seg: int, shard: int) -> str:
        return self.path(f"seg{seg}", f"shard-{shard:05d}.json")

    def markers(self, seg: int) -> dict[int, dict]:
        """Committed shards of segment ``seg``: ``{shard: marker}`` (one listing, one read per marker)."""
        out = {}
        for entry in fs.listdir(self.segment(seg), self.storage):
            base = fs.name(entry.path)
            if base.startswith("shard-") and base.endswith(".json"):
                out[int(base[6:11])] = driver_io.read_json(fs.join(self.segment(seg), base), self.storage)
        return out

    def keep_segments(self, fingerprints: list[str]) -> int:
        """Keep the leading segments whose config is unchanged, drop the rest; returns how many were kept.

        Segment ``k``'s fingerprint covers the source and every stage up to its own map stages and the
        select stage before it, so changing a select stage's parameter keeps the map work before it.
        """
        kept = 0
        for seg, want in enumerate(fingerprints):
            path = fs.join(self.segment(seg), "fingerprint.json")
            have = fs.read_json(path, self.storage)["config"] if fs.is_file(path, self.storage) else None
            if have != want or kept < seg:
                fs.delete(self.segment(seg), self.storage)
                if seg:
                    fs.delete(self.selection_path(seg - 1), self.storage)
                    fs.delete(self.selection_report(seg - 1), self.storage)
                fs.write_json(path, {"config": want}, self.storage)
            else:
                kept += 1
        return kept

    def drop_uncommitted(self, seg: int, shards: list[int]) -> None:
        """Remove what a crashed or interrupted attempt left of ``shards`` (fragments with no marker)."""
        for shard in shards:
            fs.delete(self.shard_dir(seg, shard), self.storage)

    def selection_path(self, seg: int) -> str:
        return self.path(f"select{seg}.parquet")

    def selection_report(self, seg: int) -> str:
        return self.path(f"select{seg}.json")

    def clear(self) -> None:
        """Everything but the lock."""
        for entry in fs.listdir(self.root, self.storage):
            if fs.name(entry.path) != "lock.json":
                fs.delete(fs.join(self.root, fs.name(entry.path)), self.storage)


def _alive(holder: dict) -> bool:
    """Is the run that wrote ``holder`` still running? Same host: its pid; another host: its heartbeat."""
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return int(holder["pid"]) != os.getpid()  # ours: left by an earlier run of this process
    return time.time() - float(holder.get("heartbeat", 0)) < STALE_LOCK_SECONDS
