"""A real multi-node run: a head and two worker nodes (separate raylets and object stores), S3 to S3, and
kill -9 of a worker node mid-run: the snapshot verifies and every document is there exactly once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokensift.pipeline import fs
from tokensift.pipeline.snapshot import verify
from tokensift.selectors.fasttext_text import train_classifier

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fasttext_model(sample_dir, tmp_path_factory):
    texts = lambda d: pq.read_table(sample_dir / f"{d}.parquet", columns=["text"]).column("text").to_pylist()[:150]  # noqa: E731
    path = tmp_path_factory.mktemp("ft") / "news.bin"
    return train_classifier(texts("news") + texts("math"), ["1"] * 150 + ["0"] * 150, path)


def test_preselect_chain_survives_a_killed_worker_node(s3_server, sample_dir, fasttext_model, tmp_path):
    src = s3_server("multinode/in")
    table = pa.concat_tables([pq.read_table(sample_dir / f"{d}.parquet", columns=["id", "text", "domain"]).slice(0, 120)
                              for d in ("news", "math", "code")])
    for i in range(12):
        sink = pa.BufferOutputStream()
        pq.write_table(table.slice(i * 30, 30), sink)
        fs.write_bytes(fs.join(src, f"part-{i:02d}.parquet"), sink.getvalue().to_pybytes())
    gate = tmp_path / "gate"
    gate.write_text("\n".join(table.slice(180).column("id").to_pylist()))  # shards 6.. wait for the gate
    out = s3_server("multinode/snap")
    stages = (
        f"stages=[{{stage: test_gate, gate: '{gate}', resources: {{batch_size: 30, num_cpus: 0.25, concurrency: 2}}}}, "
        f"{{stage: preselect, model: '{fasttext_model}', resources: {{num_cpus: 0.25}}}}, "
        "{stage: score_threshold, column: preselect_score, top_p: 0.5, weight: docs}]"
    )
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"gate": str(gate), "kill_after": 3, "overrides": [
        f"source.paths=[{src}/*.parquet]", f"output.path={out}", "output.rows_per_shard=50", stages]}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "support"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "multinode_job.py"), str(spec)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "killed a worker node" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1])["out"] == out
    assert verify(out) == []
    manifest = fs.read_json(fs.join(out, "manifest.json"))
    kept = pa.concat_tables([fs.read_table(fs.join(out, s["file"])) for s in manifest["shards"]])
    assert kept.num_rows == 180 and len(set(kept.column("id").to_pylist())) == 180
    # exactly the top half by score: no document lost or duplicated on the way
    everything = manifest["stages"][2]
    assert everything["rows_in"] == 360 and everything["rows_out"] == 180
    assert min(kept.column("preselect_score").to_pylist()) >= everything["stats"]["threshold"]
