"""The whole data path on a real S3-compatible server (moto on loopback): sources, work directory, snapshot."""


import pyarrow as pa
import pytest

from tokensift.config import ConfigError, RunConfig, load
from tokensift.pipeline import fs, runner
from tokensift.pipeline.snapshot import verify

STAGES = (
    "stages=[{stage: tokenize, resources: {concurrency: 2, batch_size: 16}}, "
    "{stage: score_threshold, column: n_tokens, top_p: 0.3, weight: docs}]"
)


def s3_config(src: str, out: str, *extra):
    return load(RunConfig, None, [f"source.paths=[{src}/*.parquet]", f"output.path={out}",
                                  "output.rows_per_shard=100", *extra])


def snapshot_table(out: str) -> pa.Table:
    manifest = fs.read_json(fs.join(out, "manifest.json"))
    return pa.concat_tables([fs.read_table(fs.join(out, s["file"])) for s in manifest["shards"]])


def test_s3_to_s3_publishes_a_verified_snapshot_and_no_work_directory(ray_local, s3_shards, s3_server, shards, tmp_path):
    out = s3_server("snaps/chain")
    assert runner.run(s3_config(s3_shards, out, STAGES)) == out
    assert verify(out) == []
    manifest = fs.read_json(fs.join(out, "manifest.json"))
    assert manifest["rows"] == 144 and len(manifest["shards"]) == 2
    assert [i["path"] for i in manifest["inputs"]] == [f"{s3_shards}/part-{i:02d}.parquet" for i in range(12)]
    assert fs.is_file(fs.join(out, "report", "index.md"))
    assert not fs.listdir(f"{out}.partial")
    # the same job on local disk keeps the same rows in the same order
    local = runner.run(s3_config(shards, tmp_path / "local", STAGES))
    assert snapshot_table(out).column("id").equals(snapshot_table(str(local)).column("id"))


def test_s3_overwrite_replaces_only_a_snapshot(ray_local, s3_shards, s3_server):
    out = s3_server("snaps/overwrite")
    runner.run(s3_config(s3_shards, out, "stages=[]", "output.report=false"))
    first = fs.read_json(fs.join(out, "manifest.json"))["created_at"]
    again = runner.run(s3_config(s3_shards, out, STAGES, "output.report=false", "output.overwrite=true"))
    assert verify(again) == [] and fs.read_json(fs.join(out, "manifest.json"))["rows"] == 144
    assert fs.read_json(fs.join(out, "manifest.json"))["created_at"] >= first
    foreign = s3_server("snaps/not-a-snapshot")
    fs.write_bytes(fs.join(foreign, "data.bin"), b"user data")
    with pytest.raises(FileExistsError, match="not a tokensift snapshot"):
        runner.run(s3_config(s3_shards, foreign, "stages=[]", "output.overwrite=true"))
    assert fs.read_bytes(fs.join(foreign, "data.bin")) == b"user data"


def test_output_inside_an_s3_input_is_refused(s3_shards):
    with pytest.raises(ConfigError, match="overlaps the input"):
        runner.plan(s3_config(s3_shards, f"{s3_shards}/snap", "stages=[]"))


LENGTH_CUT = "stages=[{stage: tokenize}, {stage: score_threshold, column: n_tokens, top_p: 0.5, weight: docs}]"


@pytest.mark.slow
def test_quickstart_runs_from_s3_to_s3(ray_local, s3_server, sample_dir):
    """The README's quickstart with source.paths and output.path on S3, and its model-free length cut (the one-line
    variant its comments give: the full demo's models cost minutes here and exercise no other storage path)."""
    from pathlib import Path

    src = s3_server("quickstart/in")
    for p in sorted(Path(sample_dir).glob("*.parquet")):
        fs.write_bytes(fs.join(src, p.name), p.read_bytes())
    out = s3_server("quickstart/snap")
    quickstart = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
    cfg = load(RunConfig, quickstart, [f"source.paths=[{src}/*.parquet]", f"output.path={out}", LENGTH_CUT])
    assert runner.run(cfg) == out
    assert verify(out) == [] and fs.is_file(fs.join(out, "report", "index.md"))
