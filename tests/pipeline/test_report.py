"""``write_report``: numbers in index.md computed from a hand-made snapshot, readable PNGs, a real run."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread

from tokensift.pipeline.report import write_report

SCORES = [0.9, 0.6, 0.75, 0.95, 0.62]
ROWS = {
    "id": ["news/a", "news/b", "news/c", "math/a", "math/b"],
    "text": ["Markets | rallied\n\ntoday", "Rain again", "Cup final", "2 + 2 = 4", "x <= y"],
    "domain": ["news", "news", "news", "math", "math"],
    "source": ["bbc", "bbc", "bbc", "gsm8k", "gsm8k"],
    "preselect_score": pa.array(SCORES, pa.float32()),
    "score_threshold_rank": pa.array([2, 4, 1, 0, 3], pa.int64()),
    "token_weights": pa.array([[0, 1, 1], [0.5, 0.5], [1, 1, 1, 1], [], [0, 0]], pa.list_(pa.float32())),
}


def make_snapshot(root, with_groups=True):
    (root / "data").mkdir(parents=True)
    table = pa.table(ROWS)
    shards = []
    for i, part in enumerate([table.slice(0, 3), table.slice(3)]):
        path = root / "data" / f"train-{i:05d}-of-00002.parquet"
        pq.write_table(part, path)
        shards.append({"file": f"data/{path.name}", "rows": part.num_rows, "bytes": 0, "sha256": ""})
    groups = [{"news": 8}, {"math": 4}] if with_groups else [{}, {}]
    manifest = {
        "tokensift_version": "0.1.0",
        "created_at": "2026-01-01T00:00:00+00:00",
        "config": {"name": "unit", "source": {"group_column": "domain"}},
        "inputs": [{"path": f"in{i}.parquet", "rows_read": sum(g.values()), "skipped": {}, "groups": g}
                   for i, g in enumerate(groups)],
        "stages": [
            {"index": 0, "name": "preselect", "kind": "map", "params": {}, "rows_in": 12, "rows_out": 12,
             "seconds": 1.5},
            {"index": 1, "name": "score_threshold", "kind": "select",
             "params": {"column": "preselect_score", "top_p": 0.4}, "rows_in": 12, "rows_out": 5, "seconds": 0.01,
             "stats": {"column": "preselect_score", "threshold": 0.6, "kept_docs": 5, "total_docs": 12}},
        ],
        "seconds": 3.25,
        "rows": 5,
        "columns": {f.name: str(f.type) for f in table.schema},
        "shards": shards,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def section(md, title):
    return md.split(f"### {title}\n")[1].split("###")[0]


def test_report_numbers(tmp_path):
    md = write_report(make_snapshot(tmp_path / "snap")).read_text()
    assert "- documents kept: 5 of 12 read (41.7%)" in md
    assert "| 1: score_threshold | select | 12 | 5 | 41.7% | 0.01 | column=preselect_score, threshold=0.6" in md
    assert "| news | 3 | 8 | 37.5% |" in md and "| math | 2 | 4 | 50.0% |" in md
    assert "Input counts per source are not in the manifest" in md and "| gsm8k | 2 |" in md
    assert "kept: 5 documents, min 0.6, median 0.75, max 0.95; threshold of 1: score_threshold: 0.6" in md
    # token weights: 11 tokens, sum 7; zeros 3, ones 6; per-document means 2/3, 1/2, 1, 0 (empty doc skipped)
    assert "| 0.6364 | 0 | 1 | 27.3% | 54.5% | 0.5833 |" in md
    assert "Over 5 documents and 11 tokens" in md
    highest = section(md, "preselect_score: highest")
    assert re.findall(r"`([^`]+)`", highest) == ["math/a", "news/a", "news/c"]
    assert "Markets \\| rallied today" in highest  # pipe escaped, newlines collapsed
    assert re.findall(r"`([^`]+)`", section(md, "preselect_score: lowest")) == ["news/b", "math/b", "news/c"]
    assert "x &lt;= y" in md
    assert re.findall(r"`([^`]+)`", section(md, "score_threshold_rank: first picked")) == ["math/a", "news/c", "news/a"]


def test_report_pngs_are_readable_images(tmp_path):
    index = write_report(make_snapshot(tmp_path / "snap"))
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", index.read_text())
    assert sorted(images) == ["kept_domain.png", "kept_source.png", "score_preselect_score.png",
                              "timings.png", "token_weights.png"]
    for name in images:
        img = imread(index.parent / name)
        assert img.shape[0] > 150 and img.shape[1] > 400 and img.std() > 0.05, name  # not blank


def test_pool_histogram_and_counts_only_without_input_groups(tmp_path):
    snap = make_snapshot(tmp_path / "snap", with_groups=False)
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"preselect_score": pa.array(np.linspace(0, 1, 12), pa.float32())}), pool)
    md = write_report(snap, pool=[pool]).read_text()
    assert "all scored: 12, median 0.5" in md
    assert "Input counts per domain are not in the manifest" in md and "| news | 3 |" in md
    # a second report replaces the first
    (snap / "report" / "stale.png").write_bytes(b"x")
    write_report(snap)
    assert not (snap / "report" / "stale.png").exists()


def test_bad_snapshot_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json: missing"):
        write_report(tmp_path)
    snap = make_snapshot(tmp_path / "snap")
    (snap / "data" / "train-00001-of-00002.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="train-00001-of-00002.parquet"):
        write_report(snap)


def test_report_command(tmp_path, capsys):
    from tokensift.cli import main

    assert main(["report", str(make_snapshot(tmp_path / "snap"))]) == 0
    assert "report written to" in capsys.readouterr().out


@pytest.mark.slow
def test_report_of_a_real_run(ray_local, sample_dir, tmp_path):
    from tokensift.config import RunConfig, load
    from tokensift.pipeline.runner import run

    cfg = load(RunConfig, None, [
        f"source.paths=[{sample_dir}/math.parquet,{sample_dir}/heldout/news.parquet]",
        "stages=[{stage: tokenize, tokenizer: byte},"
        " {stage: score_threshold, column: n_tokens, top_p: 0.25, weight: docs}]",
        f"output.path={tmp_path / 'snap'}", "ray.num_cpus=2",
    ])
    md = (run(cfg) / "report" / "index.md").read_text()
    assert "- snapshot: `snap`, created" in md
    manifest = json.loads((tmp_path / "snap" / "manifest.json").read_text())
    threshold = manifest["stages"][1]["stats"]["threshold"]
    assert f"threshold of 1: score_threshold: {threshold:.4g}" in md
    news, math = 222, 1187
    kept = pq.read_table(tmp_path / "snap" / "data", columns=["domain"]).column("domain").to_pylist()
    assert f"| math | {kept.count('math'):,} | {math:,} | {kept.count('math') / math:.1%} |" in md
    assert f"| news | {kept.count('news'):,} | {news:,} |" in md
    assert (tmp_path / "snap" / "report" / "score_n_tokens.png").is_file()
