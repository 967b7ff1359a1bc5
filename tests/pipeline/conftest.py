"""Fixtures of the pipeline tests: the same 12 small shards on local disk and on the S3 test server."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def sample_shards(sample_dir) -> list[pa.Table]:
    """12 small tables cut from the sample corpus (news + math), 40 rows each."""
    table = pa.concat_tables(
        [pq.read_table(sample_dir / f"{d}.parquet", columns=["id", "text", "domain"]).slice(0, 240) for d in ("news", "math")]
    )
    return [table.slice(i * 40, 40) for i in range(12)]


@pytest.fixture(scope="module")
def shards(sample_dir, tmp_path_factory):
    """The 12 shards as local parquet files: their directory."""
    out = tmp_path_factory.mktemp("shards")
    for i, t in enumerate(sample_shards(sample_dir)):
        pq.write_table(t, out / f"part-{i:02d}.parquet")
    return out


@pytest.fixture(scope="session")
def s3_shards(s3_server, sample_dir):
    """The 12 shards uploaded to the S3 test server: their ``s3://`` prefix."""
    from tokensift.pipeline import fs

    prefix = s3_server("inputs/shards")
    for i, t in enumerate(sample_shards(sample_dir)):
        sink = pa.BufferOutputStream()
        pq.write_table(t, sink)
        fs.write_bytes(fs.join(prefix, f"part-{i:02d}.parquet"), sink.getvalue().to_pybytes())
    return prefix
