import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokensift.config import ConfigError, RunConfig, load
from tokensift.pipeline import runner
from tokensift.pipeline.loader import TokenLoader
from tokensift.pipeline.registry import resolve


@pytest.mark.slow
def test_eslm_stage_writes_a_weighted_snapshot_the_loader_reads(ray_local, sample_dir, smollm2, tmp_path):
    _, tok = smollm2
    rows = pq.read_table(sample_dir / "math.parquet", columns=["id", "text", "prompt", "response"]).slice(0, 4)
    rows = rows.set_column(1, "text", pa.array([t[:160] for t in rows.column("text").to_pylist()]))
    rows = rows.set_column(2, "prompt", pa.array([t[:120] for t in rows.column("prompt").to_pylist()]))
    rows = rows.set_column(3, "response", pa.array([t[:60] for t in rows.column("response").to_pylist()]))
    pq.write_table(rows, tmp_path / "in.parquet")
    cfg = load(
        RunConfig,
        None,
        [
            f"source.paths=[{tmp_path / 'in.parquet'}]",
            f"output.path={tmp_path / 'snap'}",
            "output.report=false",
            "ray.num_cpus=2",
            f"stages=[{{stage: tokenize, tokenizer: '{tok.name_or_path}', prompt_column: prompt, response_column: response}},"
            "{stage: eslm, alpha: 0.5, batch_size: 4, resources: {num_cpus: 0.5, batch_size: 4}}]",
        ],
    )
    out = runner.run(cfg)
    snap = pa.concat_tables([pq.read_table(f) for f in sorted((out / "data").glob("*.parquet"))])
    assert snap.num_rows == 4
    weights = snap.column("token_weights").to_pylist()
    ids = snap.column("input_ids").to_pylist()
    plens = snap.column("prompt_length").to_pylist()
    stream_w = []
    for w, x, p in zip(weights, ids, plens, strict=True):
        assert len(w) == len(x) and set(w) <= {0.0, 1.0} and not any(w[:p])
        assert sum(w) == np.ceil(0.5 * (len(x) - p))
        stream_w += w
    loader = TokenLoader(out, seq_len=16, batch_size=1, shuffle=False, mask_doc_boundary=False, epochs=1)
    got = np.concatenate([b["loss_weights"].numpy().ravel() for b in loader])
    assert np.array_equal(got, np.asarray(stream_w[1 : 1 + len(got)], np.float32))  # label t = token t + 1


def test_bad_stage_params_name_the_key():
    with pytest.raises(ConfigError, match="alpah"):
        resolve([{"stage": "eslm", "alpah": 0.3}])
    with pytest.raises(ConfigError, match="gamma"):
        resolve([{"stage": "sstoken", "gamma": "high"}])
