"""Real shipped text through the whole pipeline: source -> embed (MiniLM) -> votek -> sift -> snapshot."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tokensift.config import RunConfig, load
from tokensift.models.embed import Encoder
from tokensift.pipeline import schema
from tokensift.pipeline.runner import run
from tokensift.selectors import sift


@pytest.mark.slow
def test_embed_sift_votek_snapshot(ray_local, sample_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for domain, rows in (("news", 150), ("math", 100), ("code", 50)):
        table = pq.read_table(sample_dir / f"{domain}.parquet", columns=["id", "text", "domain"]).slice(0, rows)
        pq.write_table(table, src / f"{domain}.parquet")
    questions = pq.read_table(sample_dir / "heldout" / "math.parquet", columns=["text"]).column("text").to_pylist()[:3]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps({"text": q}) + "\n" for q in questions))
    cfg = load(RunConfig, None, [
        f"source.paths=[{src}/*.parquet]",
        f"output.path={tmp_path / 'snap'}",
        "output.drop_columns=[]",
        "output.report=false",
        "stages=[{stage: embed, max_length: 128, resources: {batch_size: 64}},"
        " {stage: votek, budget: 60, k: 10},"
        f" {{stage: sift, budget: 10, queries_file: {tmp_path / 'queries.jsonl'}, max_length: 128}}]",
    ])
    out = run(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    stages = {s["name"]: s for s in manifest["stages"]}
    assert stages["embed"]["rows_out"] == 300 and stages["votek"]["rows_in"] == 300
    assert stages["votek"]["rows_out"] == 60 and stages["votek"]["stats"]["coverage"] > 0.5
    assert stages["sift"]["rows_in"] == 60 and stages["sift"]["stats"]["targets"] == 3
    assert stages["sift"]["rows_out"] == 10 and stages["sift"]["stats"]["picks"] >= 10

    snap = pq.read_table(out / "data").sort_by("sift_rank")
    kept = stages["sift"]["rows_out"]
    assert snap.num_rows == kept and sorted(snap.column("sift_rank").to_pylist()) == list(range(kept))
    domains = snap.column("domain").to_pylist()
    assert domains.count("math") >= 0.8 * kept, domains  # SIFT finds the math word problems for math queries
    # the embeddings that went through Ray equal the encoder's output for the same texts
    x = schema.embedding_matrix(snap.column(schema.EMBEDDING))
    np.testing.assert_allclose(x, Encoder(max_length=128).encode(snap.column("text").to_pylist()), atol=1e-5)
    # and SIFT's first pick is the kept document closest to the query set (the paper's first-pick property)
    q = Encoder(max_length=128).encode(questions)
    assert sift.select(x, q, 1) == [0]
