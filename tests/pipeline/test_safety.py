"""Nothing destroys what the user did not ask to destroy, ids stay unique, one run per output location."""

import json
import os
import subprocess
import sys

import numpy as np
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


def test_a_hash_collision_is_not_a_duplicate(tmp_path, monkeypatch):
    """With a hash that collides on purpose (the id's length), the exact comparison tells the two apart."""
    from tokensift.pipeline import unique

    monkeypatch.setattr(unique, "id_hashes", lambda ids: lengths(ids) << np.uint64(60))
    shards, files = [], {}
    for i, ids in enumerate([["ab", "xyz"], ["cd"], ["xyz"]]):
        d = tmp_path / f"shard-{i}"
        d.mkdir()
        pq.write_table(pa.table({"id": ids}), d / "rows.parquet")
        shards.append((i, str(d / unique.HASHES), unique.write_hashes(pa.chunked_array([ids]), str(d), None)))
        files[i] = [str(d / "rows.parquet")]
    candidates = [c for b in range(unique.BUCKETS) for c in unique._scan(b, shards, None)]
    assert sorted((a, b) for _, a, b in candidates) == [(0, 1), (0, 2)]  # "ab"~"cd" collide, "xyz" repeats
    assert unique._confirm(2 << 60, files[0], files[1], None) is None
    assert unique._confirm(3 << 60, files[0], files[2], None) == "xyz"


def lengths(ids):
    return np.array([len(s) for s in ids.to_pylist()], dtype=np.uint64)


def test_columns_whose_types_conflict_across_files_are_an_error_before_any_work(tmp_path):
    d = inputs(tmp_path, {"a.parquet": pa.table({"text": ["x"], "domain": ["news"]}),
                          "b.parquet": pa.table({"text": ["y"], "domain": [3]}),
                          "c.parquet": pa.table({"text": ["z"], "domain": pa.array([None], pa.null())})})
    with pytest.raises(SourceError, match=r"b.parquet: column 'domain' has type int64, but string in .*a.parquet"):
        runner.plan(config(d, tmp_path / "snap"))
