import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from tokensift.pipeline import sources
from tokensift.pipeline.sources import SourceError


def shard(path, fmt):
    return sources.expand([str(path)], fmt)[0]


def read_valid(path, fmt="auto", on_invalid="error", max_chars=1000):
    s = sources.expand([str(path)], fmt)[0]
    return sources.validate(sources.read(s, "text", "id"), s, on_invalid, max_chars)


def test_jsonl_plain_gz_zst_read_alike(tmp_path):
    lines = b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(5))
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        table, skipped = read_valid(tmp_path / name)
        assert table.column("text").to_pylist() == [f"doc {i}" for i in range(5)]
        assert table.column("id").to_pylist() == [f"{name}:{i}" for i in range(5)]  # derived, stable
        assert table.column("n_chars").to_pylist() == [5] * 5 and skipped == {}


def test_directory_glob_and_hf_save_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["x", "yy"], "id": ["a", "b"]}).save_to_disk(tmp_path / "hf")
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"text": ["p"]}), tmp_path / "d" / "1.parquet")
    pq.write_table(pa.table({"text": ["q"]}), tmp_path / "d" / "0.parquet")
    hf = sources.expand([str(tmp_path / "hf")])
    assert [s.format for s in hf] == ["hf"]
    table, _ = sources.validate(sources.read(hf[0], "text", "id"), hf[0], "error", 10)
    assert table.column("id").to_pylist() == ["a", "b"]
    assert [s.key for s in sources.expand([str(tmp_path / "d")])] == ["0.parquet", "1.parquet"]
    assert [s.key for s in sources.expand([str(tmp_path / "d" / "*.parquet")])] == ["0.parquet", "1.parquet"]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(SourceError, match="nope.parquet: no such file"):
        sources.expand([str(tmp_path / "nope.parquet")])
    with pytest.raises(SourceError, match=r"source.paths\[0\]: nothing matches"):
        sources.expand([str(tmp_path / "*.jsonl")])
    (tmp_path / "e.jsonl").write_bytes(b"")
    with pytest.raises(SourceError, match="e.jsonl: file is empty"):
        sources.expand([str(tmp_path / "e.jsonl")])


def test_corrupt_parquet_and_missing_text_column(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SourceError, match="bad.parquet: cannot be read as parquet"):
        sources.check(shard(tmp_path / "bad.parquet", "auto"), "text")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nt.parquet")
    with pytest.raises(SourceError, match=r"nt.parquet: no column 'text' \(columns: body\)"):
        sources.check(shard(tmp_path / "nt.parquet", "auto"), "text")


def test_non_utf8_names_file_line_and_row(tmp_path):
    (tmp_path / "x.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(SourceError, match="x.jsonl: line 2: not valid UTF-8"):
        read_valid(tmp_path / "x.jsonl")
    pq.write_table(pa.table({"text": pa.array([b"ok", b"\xff\xfe"], pa.binary())}), tmp_path / "b.parquet")
    with pytest.raises(SourceError, match="b.parquet: row 1: column 'text' is not valid UTF-8"):
        read_valid(tmp_path / "b.parquet")


def test_invalid_json_names_line(tmp_path):
    (tmp_path / "j.jsonl").write_bytes(b'{"text": "a"}\n{"text": \n')
    with pytest.raises(SourceError, match="j.jsonl: line 2: invalid JSON"):
        read_valid(tmp_path / "j.jsonl")


def test_null_text_error_or_counted_skip(tmp_path):
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "n.parquet")
    with pytest.raises(SourceError, match="n.parquet: row 1: column 'text' is null"):
        read_valid(tmp_path / "n.parquet")
    table, skipped = read_valid(tmp_path / "n.parquet", on_invalid="skip")
    assert table.column("text").to_pylist() == ["a", "c"] and skipped == {"null_text": 1}
    assert table.column("id").to_pylist() == ["n.parquet:0", "n.parquet:2"]  # ids keep source rows


def test_50mb_document_error_or_skip(tmp_path):
    big = "a" * (50 * 1024 * 1024)
    pq.write_table(pa.table({"text": ["small", big]}), tmp_path / "big.parquet")
    with pytest.raises(SourceError, match=r"big.parquet: row 1: column 'text' has 52,428,800 characters"):
        read_valid(tmp_path / "big.parquet", max_chars=10_000_000)
    table, skipped = read_valid(tmp_path / "big.parquet", on_invalid="skip", max_chars=10_000_000)
    assert table.num_rows == 1 and skipped == {"too_long": 1}


def test_null_id_is_an_error(tmp_path):
    pq.write_table(pa.table({"text": ["a", "b"], "id": ["x", None]}), tmp_path / "i.parquet")
    with pytest.raises(SourceError, match="i.parquet: row 1: column 'id' is null"):
        read_valid(tmp_path / "i.parquet")


def test_a_snapshot_with_n_chars_reads_as_a_source(tmp_path):
    pq.write_table(pa.table({"text": ["abc"], "n_chars": pa.array([99], pa.int64())}), tmp_path / "s.parquet")
    table, _ = read_valid(tmp_path / "s.parquet")
    assert table.column_names.count("n_chars") == 1 and table.column("n_chars").to_pylist() == [3]
