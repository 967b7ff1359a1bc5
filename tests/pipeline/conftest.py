"""Fixtures of the pipeline tests."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


@pytest.fixture(scope="module")
def shards(sample_dir, tmp_path_factory):
    """12 small parquet shards cut from the sample corpus (news + math), 40 rows each."""
    out = tmp_path_factory.mktemp("shards")
    table = pa.concat_tables(
        [pq.read_table(sample_dir / f"{d}.parquet", columns=["id", "text", "domain"]).slice(0, 240) for d in ("news", "math")]
    )
    for i in range(12):
        pq.write_table(table.slice(i * 40, 40), out / f"part-{i:02d}.parquet")
    return out
