"""Input shards: expand globs/dirs, check them before any work, read one shard into an Arrow table.

Formats: Parquet, JSONL (plain, ``.gz``, ``.zst``) and HF ``save_to_disk`` directories (their ``.arrow``
files). One input file is one shard: the unit of parallel reading and of resume markers.
Every problem is one :class:`SourceError` naming the file, and the row and column where they apply.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tokensift.pipeline import schema

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".ndjson")


class SourceError(ValueError):
    """Bad input: the message names the file and, where it applies, the row and column."""


@dataclass(frozen=True)
class InputShard:
    """One input file. ``key`` is its path relative to the configured path it came from (used in ids)."""

    index: int
    path: str
    format: str
    key: str


def expand(paths: list[str], fmt: str = "auto") -> list[InputShard]:
    """Expand files, directories and globs into sorted shards; missing or empty inputs are errors."""
    shards: list[InputShard] = []
    for i, spec in enumerate(paths):
        found = _expand_one(spec, fmt)
        if not found:
            raise SourceError(f"source.paths[{i}]: nothing matches {spec!r}")
        for path, kind, key in found:
            if os.path.getsize(path) == 0:
                raise SourceError(f"{path}: file is empty")
            shards.append(InputShard(len(shards), path, kind, key))
    seen: dict[str, str] = {}
    for s in shards:
        if s.path in seen:
            raise SourceError(f"{s.path}: listed twice in source.paths; its rows would be duplicated")
        seen[s.path] = s.key
    return shards


def _expand_one(spec: str, fmt: str) -> list[tuple[str, str, str]]:
    if glob.has_magic(spec):
        base = Path(os.path.dirname(spec.split("*")[0].split("?")[0].split("[")[0]) or ".")
        files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        return [(p, _format_of(p, fmt), str(Path(p).relative_to(base))) for p in files if _format_of(p, fmt)]
    path = Path(spec)
    if not path.exists():
        raise SourceError(f"{spec}: no such file or directory")
    if path.is_file():
        kind = _format_of(str(path), fmt)
        if not kind:
            raise SourceError(f"{spec}: unknown format (use .parquet, .jsonl[.gz|.zst] or set source.format)")
        return [(str(path), kind, path.name)]
    if (path / "state.json").is_file() and fmt in ("auto", "hf"):
        state = json.loads((path / "state.json").read_text())
        return [(str(path / f["filename"]), "hf", f"{path.name}/{f['filename']}") for f in state["_data_files"]]
    files = sorted(p for p in path.rglob("*") if p.is_file() and _format_of(str(p), fmt))
    return [(str(p), _format_of(str(p), fmt), str(p.relative_to(path))) for p in files]


def _format_of(path: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(".arrow"):
        return "hf"
    return None


def fingerprint(shard: InputShard, how: str = "sha256") -> dict:
    """Identity of an input file for the manifest and for resume checks."""
    st = os.stat(shard.path)
    out = {"path": shard.path, "format": shard.format, "bytes": st.st_size}
    if how == "sha256":
        with open(shard.path, "rb") as f:
            out["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    else:
        out["mtime_ns"] = st.st_mtime_ns
    return out


def check(shard: InputShard, text_column: str) -> list[str]:
    """Cheap pre-flight: the file opens and has ``text_column``. Returns the file's column names."""
    try:
        if shard.format == "parquet":
            names = pq.ParquetFile(shard.path).schema_arrow.names
        elif shard.format == "hf":
            with pa.memory_map(shard.path) as f:
                names = pa.ipc.open_stream(f).schema.names
        else:
            with _open_binary(shard.path) as f:
                first = f.readline()
            names = list(_parse_json_line(first, shard.path, 1))
    except SourceError:
        raise
    except Exception as e:  # corrupt files surface here with the library's own words
        raise SourceError(f"{shard.path}: cannot be read as {shard.format}: {e}") from None
    if text_column not in names:
        raise SourceError(f"{shard.path}: no column {text_column!r} (columns: {', '.join(names)})")
    return names


def read(shard: InputShard, text_column: str, id_column: str) -> pa.Table:
    """The shard as a table with ``id`` (given or ``<key>:<row>``), ``text`` and the file's other columns."""
    try:
        table = _read_raw(shard)
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"{shard.path}: cannot be read as {shard.format}: {e}") from None
    if text_column not in table.column_names:
        raise SourceError(f"{shard.path}: no column {text_column!r} (columns: {', '.join(table.column_names)})")
    text = _as_utf8(table.column(text_column), shard, text_column)
    ids = (
        pc.cast(table.column(id_column), pa.string())
        if id_column in table.column_names
        else pa.array([f"{shard.key}:{r}" for r in range(table.num_rows)], pa.string())
    )
    if ids.null_count:
        row = pc.index(pc.is_null(ids), True).as_py()
        raise SourceError(f"{shard.path}: row {row}: column {id_column!r} is null")
    rest = [c for c in table.column_names if c not in (text_column, id_column, schema.ID, schema.TEXT)]
    return pa.table(
        [ids, text] + [table.column(c) for c in rest], names=[schema.ID, schema.TEXT] + rest
    )


def _read_raw(shard: InputShard) -> pa.Table:
    if shard.format == "parquet":
        return pq.read_table(shard.path)
    if shard.format == "hf":
        with pa.memory_map(shard.path) as f:
            return pa.ipc.open_stream(f).read_all()
    rows = []
    with _open_binary(shard.path) as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                rows.append(_parse_json_line(line, shard.path, line_no))
    if not rows:
        raise SourceError(f"{shard.path}: no JSON records")
    return pa.Table.from_pylist(rows)


def _parse_json_line(line: bytes | str, path: str, line_no: int) -> dict:
    try:
        text = line.decode("utf-8") if isinstance(line, bytes) else line
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: line {line_no}: not valid UTF-8 at byte {e.start}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: line {line_no}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(record, dict):
        raise SourceError(f"{path}: line {line_no}: expected a JSON object, got {type(record).__name__}")
    return record


def _as_utf8(column: pa.ChunkedArray, shard: InputShard, name: str) -> pa.ChunkedArray:
    """Text as valid UTF-8 strings; binary columns are decoded strictly (error names the row)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return pc.cast(column, pa.string()) if pa.types.is_large_string(column.type) else column
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise SourceError(f"{shard.path}: column {name!r} has type {column.type}, expected a string")
    values = column.to_pylist()
    out = []
    for row, v in enumerate(values):
        try:
            out.append(None if v is None else v.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise SourceError(f"{shard.path}: row {row}: column {name!r} is not valid UTF-8 at byte {e.start}") from None
    return pa.chunked_array([pa.array(out, pa.string())])


def _open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def validate(table: pa.Table, shard: InputShard, on_invalid: str, max_doc_chars: int) -> tuple[pa.Table, dict]:
    """Check every row's text: not null, at most ``max_doc_chars`` characters.

    ``on_invalid="error"`` raises on the first bad row (naming file, row and column); ``"skip"`` drops bad
    rows and returns their counts by reason. Adds ``n_chars`` (int64).
    """
    text = table.column(schema.TEXT)
    n_chars = pc.fill_null(pc.utf8_length(text), 0).cast(pa.int64())
    bad = {"null_text": pc.is_null(text), "too_long": pc.greater(n_chars, max_doc_chars)}
    skipped = {}
    keep = None
    for reason, mask in bad.items():
        count = pc.sum(mask).as_py() or 0
        if not count:
            continue
        if on_invalid == "error":
            row = pc.index(mask, True).as_py()
            detail = "is null" if reason == "null_text" else f"has {n_chars[row].as_py():,} characters, above source.max_doc_chars={max_doc_chars:,}"
            raise SourceError(f"{shard.path}: row {row}: column 'text' {detail} (set source.on_invalid=skip to drop such rows)")
        skipped[reason] = count
        keep = pc.invert(mask) if keep is None else pc.and_(keep, pc.invert(mask))
    if schema.N_CHARS in table.column_names:  # a snapshot as a source: recount, do not duplicate
        table = table.drop_columns([schema.N_CHARS])
    table = table.append_column(schema.N_CHARS, n_chars)
    return (table.filter(keep) if keep is not None else table), skipped
