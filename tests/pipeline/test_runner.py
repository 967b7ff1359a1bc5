import importlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokensift.config import ConfigError, RunConfig, load
from tokensift.pipeline import runner
from tokensift.pipeline.registry import register
from tokensift.pipeline.snapshot import verify
from tokensift.pipeline.sources import SourceError
from tokensift.pipeline.stage import Selection

ROOT = Path(__file__).resolve().parents[2]


def config(shards, out, *extra):
    return load(
        RunConfig,
        None,
        [
            f"source.paths=[{shards}/*.parquet]",
            f"output.path={out}",
            "output.report=false",
            "output.rows_per_shard=100",
            *extra,
        ],
    )


STAGES = [
    "stages=[{stage: tokenize, resources: {concurrency: 2, batch_size: 16}}, "
    "{stage: score_threshold, column: n_tokens, top_p: 0.3, weight: docs}]"
]


def test_run_writes_a_verified_snapshot_that_datasets_reads(ray_local, shards, tmp_path):
    out = runner.run(config(shards, tmp_path / "snap", *STAGES))
    assert verify(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 144  # ceil(0.3 * 480)
    assert [s["file"] for s in manifest["shards"]] == [f"data/train-0000{i}-of-00002.parquet" for i in range(2)]
    assert [s["name"] for s in manifest["stages"]] == ["tokenize", "score_threshold"]
    assert manifest["stages"][1]["rows_in"] == 480 and manifest["stages"][1]["rows_out"] == 144
    assert sum(i["rows_read"] for i in manifest["inputs"]) == 480
    assert all(i["bytes"] > 0 and i["mtime_ns"] for i in manifest["inputs"])  # metadata, no read in the driver
    import datasets

    ds = datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train")
    assert len(ds) == 144 and len(set(ds["id"])) == 144
    assert "score_threshold_rank" not in ds.column_names  # a threshold keeps rows by score: sort by it
    assert all(len(ids) == n for ids, n in zip(ds["input_ids"], ds["n_tokens"], strict=True))
    # the kept set is exactly the top 30 % by n_tokens over all shards (ties by id)
    every = pa.concat_tables([pq.read_table(p) for p in sorted(shards.glob("*.parquet"))])
    lengths = {i: len(t.encode()) + 1 for i, t in zip(every["id"].to_pylist(), every["text"].to_pylist(), strict=True)}
    expected = sorted(lengths, key=lambda i: (-lengths[i], i))[:144]
    assert set(ds["id"]) == set(expected)
    assert not (tmp_path / "snap.partial").exists()


def test_bad_shard_fails_with_file_and_row_and_publishes_nothing(ray_local, shards, tmp_path):
    bad = tmp_path / "in"
    bad.mkdir()
    for p in sorted(shards.glob("*.parquet"))[:3]:
        (bad / p.name).write_bytes(p.read_bytes())
    pq.write_table(pa.table({"id": ["z0", "z1"], "text": ["fine", None], "domain": ["x", "x"]}), bad / "part-99.parquet")
    with pytest.raises(SourceError, match=r"part-99.parquet: row 1: column 'text' is null"):
        runner.run(config(bad, tmp_path / "snap", *STAGES))
    assert not (tmp_path / "snap").exists()


def test_skip_mode_counts_in_the_manifest(ray_local, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"text": ["a", None, "ccc", "d" * 50]}), src / "x.parquet")
    out = runner.run(
        config(src, tmp_path / "snap", "source.on_invalid=skip", "source.max_doc_chars=10", "stages=[{stage: tokenize}]")
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 2 and manifest["inputs"][0]["skipped"] == {"null_text": 1, "too_long": 1}


def test_contract_and_existing_output_checked_before_work(shards, tmp_path):
    cfg = config(shards, tmp_path / "snap", "stages=[{stage: score_threshold, column: preselect_score}]")
    with pytest.raises(ConfigError, match=r"stages\[0\] \(score_threshold\) needs column\(s\) preselect_score"):
        runner.plan(cfg)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="output.overwrite"):
        runner.run(config(shards, tmp_path / "exists", "stages=[]"))


@dataclass
class NoParams:
    pass


@register("test_select_unknown", kind="select", params=NoParams)  # shipped by value to the select task (below)
class SelectUnknown:
    """A broken select stage: keeps the first row and an id that is not in its input."""

    def __init__(self, params):
        pass

    @classmethod
    def needs(cls, params):
        return ["id"]

    def select(self, table: pa.Table) -> Selection:
        return Selection(ids=[table.column("id")[0].as_py(), "no-such-id"])


def test_select_stage_returning_an_unknown_id_fails_and_publishes_nothing(ray_local, shards, tmp_path):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import a test module
    with pytest.raises(RuntimeError, match=r"stages\[0\] \(test_select_unknown\) returned id\(s\) not in its input, e.g. 'no-such-id'"):
        runner.run(config(shards, tmp_path / "snap", "stages=[{stage: test_select_unknown}]"))
    assert not (tmp_path / "snap").exists()


def test_verify_detects_tampering(ray_local, shards, tmp_path):
    out = runner.run(config(shards, tmp_path / "snap", "stages=[]"))
    shard = next((out / "data").glob("*.parquet"))
    pq.write_table(pq.read_table(shard).slice(1), shard)
    (out / "data" / "extra.parquet").write_bytes(b"x")
    problems = verify(out)
    assert any("sha256 differs" in p for p in problems) and any("rows, manifest says" in p for p in problems)
    assert any("extra.parquet: not in the manifest" in p for p in problems)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_killed_run_resumes_to_the_same_snapshot(ray_local, shards, tmp_path, where, request, monkeypatch):
    """SIGKILL of the driver mid-run, run again: same rows, same shard bytes as an uninterrupted run."""
    from ray import cloudpickle

    from tokensift.pipeline import fs

    if where == "s3":
        src, base = request.getfixturevalue("s3_shards"), request.getfixturevalue("s3_server")("killed")
    else:
        src, base = str(shards), str(tmp_path)
    gate = tmp_path / "gate"
    held = pq.read_table(sorted(shards.glob("*.parquet"))[6:], columns=["id"]).column("id").to_pylist()
    gate.write_text("\n".join(held))
    stages = (
        f"stages=[{{stage: test_gate, gate: '{gate}', resources: {{batch_size: 40}}}}, "
        "{stage: tokenize, resources: {batch_size: 40}}, "
        "{stage: score_threshold, column: n_tokens, top_p: 0.5, weight: docs}]"
    )
    args = [f"source.paths=[{src}/*.parquet]", "output.report=false", "output.rows_per_shard=100", stages]
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'tests' / 'support'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("RAY_AUTH_MODE", None)  # the default: the embedded Ray runs with a fresh auth token
    code = "import sys, gate_stage; from tokensift.cli import main; sys.exit(main(sys.argv[1:]))"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    out = fs.join(base, "resumed")
    cmd = [sys.executable, "-c", code, "run", str(cfg), f"output.path={out}", *args]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    markers = fs.join(f"{out}.partial", "seg0")

    def committed() -> int:
        return len([e for e in fs.listdir(markers) if fs.name(e.path).startswith("shard-") and e.path.endswith(".json")])

    deadline = time.time() + 180
    while committed() < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= committed() <= 6
    assert not fs.exists(fs.join(out, "manifest.json"))  # nothing half-published is visible to readers
    gate.unlink()
    resumed = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming the interrupted run" in resumed.stderr

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "support"))  # the uninterrupted run, in this process
    cloudpickle.register_pickle_by_value(importlib.import_module("gate_stage"))
    reference = fs.join(base, "reference")
    runner.run(load(RunConfig, str(cfg), [f"output.path={reference}", *args]))
    a, b = (fs.read_json(fs.join(d, "manifest.json")) for d in (out, reference))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["rows"] == b["rows"] == 240
    assert verify(out) == [] and not fs.listdir(f"{out}.partial")


def test_embedded_ray_listens_on_loopback_only(ray_local):
    """Every socket a Ray process of the embedded cluster listens on is loopback."""
    import psutil

    ray_pids = {p.pid for p in psutil.Process().children(recursive=True) if "ray" in p.name() or "gcs" in p.name()}
    listening = [(c.laddr.ip, c.pid) for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.pid in ray_pids]
    assert listening and all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip, _ in listening), listening


def test_a_new_select_stage_keeps_the_map_work_and_changed_inputs_are_refused(ray_local, shards, tmp_path, monkeypatch):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    src = tmp_path / "in"
    src.mkdir()
    for p in sorted(shards.glob("*.parquet"))[:4]:
        (src / p.name).write_bytes(p.read_bytes())
    tokenize = "{stage: tokenize, resources: {batch_size: 40}}"
    failing = f"stages=[{tokenize}, {{stage: test_select_unknown}}]"
    with pytest.raises(RuntimeError, match="not in its input"):  # fails after the map work of segment 0
        runner.run(config(src, tmp_path / "snap", failing))
    assert len(list((tmp_path / "snap.partial" / "seg0").glob("shard-*.json"))) == 4
    reads = []
    real = runner.stream_markers
    monkeypatch.setattr(runner, "stream_markers", lambda dataset, shards, *a: reads.append(len(shards)) or real(dataset, shards, *a))
    threshold = "{stage: score_threshold, column: n_tokens, top_p: 0.5, weight: docs}"
    out = runner.run(config(src, tmp_path / "snap", f"stages=[{tokenize}, {threshold}]"))
    assert reads == [4]  # only segment 1 read its shards: the tokenized fragments of segment 0 were kept
    assert json.loads((out / "manifest.json").read_text())["rows"] == 40 * 4 // 2
    with pytest.raises(RuntimeError, match="not in its input"):
        runner.run(config(src, tmp_path / "again", failing))
    (src / "part-00.parquet").write_bytes((src / "part-01.parquet").read_bytes())  # an input changes
    with pytest.raises(FileExistsError, match="different inputs"):
        runner.run(config(src, tmp_path / "again", failing))
