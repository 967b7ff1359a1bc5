"""``resources.compute: tasks`` (the stage runs inside the read tasks, built once per worker process) and part codecs."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokensift.config import ConfigError, RunConfig, load
from tokensift.pipeline import runner
from tokensift.pipeline.registry import register, resolve

BUILDS: dict[str, int] = {}  # per worker process: how often the stage was built, by tag


@dataclass
class WhereParams:
    tag: str = ""


@register("test_where", kind="map", params=WhereParams)
class Where:
    """Records the Ray task each batch ran in, the worker pid, and how often this process built the stage."""

    def __init__(self, params: WhereParams):
        BUILDS[params.tag] = BUILDS.get(params.tag, 0) + 1
        self.builds = BUILDS[params.tag]

    @classmethod
    def needs(cls, params):
        return ["id"]

    @classmethod
    def adds(cls, params):
        return ["task_name", "worker_pid", "builds"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        n = batch.num_rows
        return (
            batch.append_column("task_name", pa.array([ray.get_runtime_context().get_task_name()] * n, pa.string()))
            .append_column("worker_pid", pa.array([os.getpid()] * n, pa.int64()))
            .append_column("builds", pa.array([self.builds] * n, pa.int64()))
        )


# the stage class travels to Ray workers by value: they cannot import this test module
pytest.importorskip("ray").cloudpickle.register_pickle_by_value(sys.modules[__name__])


def run(shards, out, stages, *overrides):
    cfg = load(RunConfig, None, [f"source.paths=[{shards}/*.parquet]", f"output.path={out}", "output.report=false", *overrides])
    cfg.stages = stages
    return runner.run(cfg)


def test_task_stage_runs_inside_the_read_task_and_is_built_once_per_process(ray_local, shards, tmp_path):
    out = run(shards, tmp_path / "snap", [{"stage": "test_where", "tag": str(tmp_path), "resources": {"compute": "tasks", "batch_size": 16}}])
    table = pq.read_table(out / "data")
    assert table.column("id").to_pylist() == pq.read_table(shards, columns=["id"]).column("id").to_pylist()
    assert set(table.column("task_name").to_pylist()) == {"ReadShards->MapBatches(run_in_task)"}
    assert set(table.column("builds").to_pylist()) == {1}
    assert len(set(table.column("worker_pid").to_pylist())) < 12  # worker processes served several shards
    stage = json.loads((out / "manifest.json").read_text())["stages"][0]
    assert stage["params"] == {"tag": str(tmp_path)} and stage["seconds"] > 0


def test_task_or_actor_compute_and_part_codec_do_not_change_the_snapshot(ray_local, shards, tmp_path):
    tail = {"stage": "score_threshold", "column": "n_tokens", "top_p": 0.3, "weight": "docs"}
    snaps = [
        run(shards, tmp_path / compute, [{"stage": "tokenize", "resources": {"compute": compute, "batch_size": 16}}, tail],
            f"output.part_compression={codec}")
        for compute, codec in (("tasks", "none"), ("actors", "zstd"))
    ]
    a, b = (json.loads((s / "manifest.json").read_text()) for s in snaps)
    assert a["rows"] == b["rows"] == 144
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_unknown_part_codec_is_a_config_error(shards, tmp_path):
    with pytest.raises(ConfigError, match="output.part_compression: 'zip' is not one of none, zstd, lz4, snappy"):
        load(RunConfig, None, [f"source.paths=[{shards}/*.parquet]", f"output.path={tmp_path}/s", "output.part_compression=zip"])


def test_unknown_compute_is_a_config_error():
    with pytest.raises(ConfigError, match=r"stages\[0\].resources.compute: 'gpus' is not one of actors, tasks"):
        resolve([{"stage": "tokenize", "resources": {"compute": "gpus"}}])


def test_preselect_defaults_to_tasks_and_config_overrides_field_by_field(tmp_path):
    (entry,) = resolve([{"stage": "preselect", "model": str(tmp_path / "m.bin"), "resources": {"batch_size": 8}}])
    assert (entry.resources.compute, entry.resources.num_cpus, entry.resources.batch_size) == ("tasks", 1.0, 8)
