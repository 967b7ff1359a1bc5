"""Embedded Ray start-up + the quickstart job vs the same stages called in-process (no Ray).

Ours: ``tokensift run examples/quickstart.yaml`` in a fresh process (Ray start, Ray Data streaming,
resume markers, snapshot with checksums). Anchor: the same tokenize + score_threshold stages called
directly on the same parquet files with pyarrow, writing one parquet file.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tokensift.config import RunConfig, load
from tokensift.pipeline.registry import resolve

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "quickstart.yaml"
LENGTH_CUT = "stages=[{stage: tokenize}, {stage: score_threshold, column: n_tokens, top_p: 0.5, weight: docs}]"  # no models


def in_process(cfg, out: Path) -> int:
    files = sorted(ROOT.glob("sample_data/*.parquet"))
    table = pa.concat_tables([pq.read_table(f, columns=["id", "text", "domain"]) for f in files])
    table = table.append_column("n_chars", pc.utf8_length(table.column("text")).cast(pa.int64()))
    tokenize, select = resolve(cfg.stages)
    stage = tokenize.spec.cls(tokenize.params)
    size = tokenize.resources.batch_size
    table = pa.concat_tables([stage(table.slice(i, size)) for i in range(0, table.num_rows, size)])
    keep = select.spec.cls(select.params).select(table).ids
    kept = table.filter(pc.is_in(table.column("id"), value_set=pa.array(keep)))
    pq.write_table(kept, out)
    return kept.num_rows


def run(quick: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "snap"
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "tokensift.cli", "run", str(CONFIG), f"output.path={out}", "output.report=false", LENGTH_CUT],
            cwd=ROOT, check=True, capture_output=True,
        )
        ours = time.perf_counter() - start
        cfg = load(RunConfig, CONFIG, [LENGTH_CUT])
        start = time.perf_counter()
        rows = in_process(cfg, Path(tmp) / "plain.parquet")
        anchor = time.perf_counter() - start
    return [{
        "measure": f"quickstart wall time ({rows:,} docs kept)",
        "ours": ours, "anchor": anchor, "unit": "s", "ratio": anchor / ours,
        "note": "anchor/ours (<1: Ray start-up and streaming cost on this small input)",
    }]
