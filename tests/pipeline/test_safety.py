"""Nothing destroys what the user did not ask to destroy, ids stay unique, one run per output location."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokensift.config import ConfigError, RunConfig, load
from tokensift.pipeline import runner
from tokensift.pipeline.sources import SourceError
from tokensift.pipeline.unique import DuplicateIdError
from tokensift.pipeline.workdir import LockedError, WorkDir


def config(src, out, *extra):
    return load(RunConfig, None, [f"source.paths=[{src}]", f"output.path={out}", "output.report=false", *extra])


def inputs(tmp_path, tables: dict[str, pa.Table]):
    d = tmp_path / "in"
    d.mkdir()
    for name, t in tables.items():
        pq.write_table(t, d / name)
    return d


@pytest.mark.parametrize("where", ["same", "inside", "parent", "glob_dir"])
def test_output_that_is_contains_or_is_inside_an_input_is_refused(tmp_path, where):
    d = inputs(tmp_path, {"a.parquet": pa.table({"text": ["x"]})})
    src, out = {"same": (d, d), "inside": (d, d / "snap"), "parent": (d, tmp_path),
                "glob_dir": (f"{d}/*.parquet", d / "snap")}[where]
    with pytest.raises(ConfigError, match="overlaps the input"):
        runner.run(config(src, out, "output.overwrite=true"))
    assert (d / "a.parquet").is_file()


def test_overwrite_replaces_only_a_tokensift_snapshot(tmp_path):
    d = inputs(tmp_path, {"a.parquet": pa.table({"text": ["x"]})})
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not a tokensift snapshot"):
        runner.run(config(d, mine, "output.overwrite=true"))
    assert (mine / "holiday.jpg").read_bytes() == b"precious"


def test_duplicate_ids_in_one_shard_name_the_rows(ray_local, tmp_path):
    d = inputs(tmp_path, {"a.parquet": pa.table({"id": ["p", "q", "p"], "text": ["1", "2", "3"]})})
    with pytest.raises(SourceError, match=r"a.parquet: rows 0 and 2: duplicate id 'p'"):
        runner.run(config(d, tmp_path / "snap"))
    assert not (tmp_path / "snap").exists()


def test_duplicate_ids_across_shards_name_both_files(ray_local, tmp_path):
    d = inputs(tmp_path, {"a.parquet": pa.table({"id": ["p", "q"], "text": ["1", "2"]}),
                          "b.parquet": pa.table({"id": ["r", "q"], "text": ["3", "4"]})})
    with pytest.raises(DuplicateIdError, match=r"duplicate id 'q' .* in .*/in/[ab].parquet and .*/in/[ab].parquet"):
        runner.run(config(d, tmp_path / "snap"))
    assert not (tmp_path / "snap").exists()


def test_a_second_run_on_the_same_output_gets_a_clear_error_naming_the_holder(tmp_path):
    out = str(tmp_path / "snap")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "snap.partial").mkdir()
        (tmp_path / "snap.partial" / "lock.json").write_text(json.dumps(
            {"host": os.uname().nodename, "pid": holder.pid, "run_id": "other", "since": "now", "heartbeat": 0}))
        with pytest.raises(LockedError, match=f"in use by another run \\(pid {holder.pid} on "):
            WorkDir(out, "inputs")
    finally:
        holder.kill()
        holder.wait()
    work = WorkDir(out, "inputs")  # the holder is gone: its stale lock is taken over
    assert json.loads((tmp_path / "snap.partial" / "lock.json").read_text())["run_id"] == work.run_id
    work.unlock()
    assert not (tmp_path / "snap.partial" / "lock.json").exists()
