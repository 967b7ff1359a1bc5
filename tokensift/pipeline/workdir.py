"""The temporary sibling directory of a run: per-shard parts, completion markers, selections.

Layout of ``<out>.partial/``::

    run.json                      config fingerprint (a resume must match it)
    seg0/part-00003.parquet       rows of input shard 3 after the map stages of segment 0
    seg0/part-00003.json          its completion marker: rows, stage seconds, source statistics
    select0.parquet / .json       ids kept by the first select stage, their rank, and its statistics
    final/                        the snapshot being assembled, renamed to ``<out>`` when complete

Every file is written to a temporary name and renamed, so a marker exists only for a complete part.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP = 8192  # rows per Parquet row group of parts: reading a part back decodes its groups in parallel
CODECS = ("none", "zstd", "lz4", "snappy")  # for parts (output.part_compression)


class WorkDir:
    def __init__(self, out: Path, fingerprint: str, compression: str, restart: bool = False):
        self.out, self.compression = out, compression
        self.root = out.with_name(out.name + ".partial")
        if restart and self.root.exists():
            shutil.rmtree(self.root)
        run = self.root / "run.json"
        if run.is_file():
            previous = json.loads(run.read_text())["fingerprint"]
            if previous != fingerprint:
                raise FileExistsError(
                    f"{self.root} holds an interrupted run with a different config or inputs; "
                    "remove it or pass --restart"
                )
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json(run, {"fingerprint": fingerprint})

    @property
    def resumed(self) -> bool:
        return any(self.root.glob("seg*/part-*.json"))

    def part(self, segment: int, shard: int) -> Path:
        return self.root / f"seg{segment}" / f"part-{shard:05d}.parquet"

    def marker(self, segment: int, shard: int) -> dict | None:
        path = self.part(segment, shard).with_suffix(".json")
        return json.loads(path.read_text()) if path.is_file() else None

    def write_part(self, segment: int, shard: int, table: pa.Table, info: dict) -> None:
        path = self.part(segment, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(path, table, self.compression)
        write_json(path.with_suffix(".json"), info)

    def selection_path(self, index: int) -> Path:
        return self.root / f"select{index}.parquet"

    def final(self) -> Path:
        path = self.root / "final"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir()
        return path

    def publish(self, final: Path, overwrite: bool) -> None:
        """Rename the finished snapshot into place, then drop the work directory."""
        old = None
        if self.out.exists():
            if not overwrite:
                raise FileExistsError(f"{self.out} exists; set output.overwrite=true to replace it")
            old = self.out.with_name(self.out.name + ".old")
            os.replace(self.out, old)
        os.replace(final, self.out)
        shutil.rmtree(self.root)
        if old is not None:
            shutil.rmtree(old)


def write_parquet(path: Path, table: pa.Table, compression: str = "zstd") -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP, compression=compression)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)
