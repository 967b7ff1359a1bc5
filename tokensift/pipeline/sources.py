"""Input shards: expand globs/dirs, check them before any work, read one shard into an Arrow table.

Formats: Parquet, JSONL (plain, ``.gz``, ``.zst``) and HF ``save_to_disk`` directories (their ``.arrow``
files). One input file is one shard: the unit of parallel reading and of resume markers.
Every problem is one :class:`SourceError` naming the file, and the row and column where they apply.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tokensift.pipeline import fs, schema

IDS_KEY = b"tokensift.ids"  # schema metadata of a read shard: were its ids given or generated?
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


def expand(paths: list[str], fmt: str = "auto", storage=None) -> list[InputShard]:
    """Expand files, directories and globs (local or URIs) into sorted shards; missing or empty inputs are errors."""
    shards: list[InputShard] = []
    for i, spec in enumerate(paths):
        found = _expand_one(str(spec), fmt, storage)
        if not found:
            raise SourceError(f"source.paths[{i}]: nothing matches {spec!r}")
        for path, kind, key, size in found:
            if size == 0:
                raise SourceError(f"{path}: file is empty")
            shards.append(InputShard(len(shards), path, kind, key))
    seen: set[str] = set()
    for s in shards:
        if s.path in seen:
            raise SourceError(f"{s.path}: listed twice in source.paths; its rows would be duplicated")
        seen.add(s.path)
    return shards


def base_of(spec: str) -> str:
    """The location an input spec reads from: a glob's directory before its first wildcard, else itself."""
    spec = str(spec)
    if not glob.has_magic(spec):
        return spec
    head = re.split(r"[*?\[]", spec, maxsplit=1)[0]
    return head.rsplit("/", 1)[0] if "/" in head else "."


def _expand_one(spec: str, fmt: str, storage) -> list[tuple[str, str, str, int]]:
    """``(path, format, key, size)`` of every input file ``spec`` names."""
    if glob.has_magic(spec):
        base = base_of(spec)
        pattern = _glob_regex(spec[len(base):].lstrip("/"))
        return [
            (path, _format_of(path, fmt), key, e.size)
            for path, key, e in _files_under(base, storage)
            if pattern.fullmatch(key) and _format_of(path, fmt)
        ]
    info = fs.info(spec, storage)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"{spec}: no such file or directory")
    if info.type == pafs.FileType.File:
        kind = _format_of(spec, fmt)
        if not kind:
            raise SourceError(f"{spec}: unknown format (use .parquet, .jsonl[.gz|.zst] or set source.format)")
        return [(_canonical(spec), kind, fs.name(spec), info.size)]
    state = fs.join(spec, "state.json")
    if fmt in ("auto", "hf") and fs.is_file(state, storage):
        files = fs.read_json(state, storage)["_data_files"]
        return [
            (_canonical(fs.join(spec, f["filename"])), "hf", f"{fs.name(spec)}/{f['filename']}",
             fs.info(fs.join(spec, f["filename"]), storage).size)
            for f in files
        ]
    return [(path, _format_of(path, fmt), key, e.size) for path, key, e in _files_under(spec, storage) if _format_of(path, fmt)]


def _files_under(base: str, storage) -> list[tuple[str, str, pafs.FileInfo]]:
    """Files below ``base``, sorted: ``(path or URI, path relative to base, info)``."""
    filesystem, inner = fs.resolve(base, storage)
    out = []
    for e in fs.listdir(base, storage, recursive=True):
        if e.type == pafs.FileType.File:
            key = e.path[len(inner):].lstrip("/")
            out.append((_canonical(fs.join(base, key)), key, e))
    return sorted(out)


def _canonical(path: str) -> str:
    return path if fs.is_uri(path) else os.path.abspath(os.path.expanduser(path))


def _glob_regex(pattern: str) -> re.Pattern:
    """A glob (``*``, ``?``, ``[...]``, ``**`` for any depth) as a regex over ``/``-separated relative paths."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


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


def fingerprint(shard: InputShard, storage=None) -> dict:
    """Identity of an input file from the filesystem's metadata (size and modification time), no read.

    Content hashes, when ``source.fingerprint=sha256``, are computed by the read tasks
    (:func:`content_sha256`) and recorded in the shard markers.
    """
    info = fs.info(shard.path, storage)
    mtime = info.mtime_ns if info.mtime_ns is not None else None
    return {"path": shard.path, "format": shard.format, "bytes": info.size, "mtime_ns": mtime}


def content_sha256(shard: InputShard, storage=None) -> str:
    """sha256 of an input file's bytes, streamed."""
    filesystem, inner = fs.resolve(shard.path, storage)
    h = hashlib.sha256()
    with filesystem.open_input_stream(inner) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check(shard: InputShard, text_column: str, storage=None) -> pa.Schema:
    """Cheap pre-flight: the file opens and has ``text_column``. Returns its schema (JSONL: its first record's)."""
    try:
        if shard.format == "parquet":
            with _open_file(shard, storage) as f:
                found = pq.ParquetFile(f).schema_arrow
        elif shard.format == "hf":
            with _open_file(shard, storage) as f:
                found = pa.ipc.open_stream(f).schema
        else:
            with _open_stream(shard, storage) as f:
                first = next(_lines(f), b"")
            found = pa.Table.from_pylist([_parse_json_line(first, shard.path, 1)]).schema
    except SourceError:
        raise
    except Exception as e:  # corrupt files surface here with the library's own words
        raise SourceError(f"{shard.path}: cannot be read as {shard.format}: {e}") from None
    if text_column not in found.names:
        raise SourceError(f"{shard.path}: no column {text_column!r} (columns: {', '.join(found.names)})")
    return found


def check_compatible(schemas: list[tuple[str, pa.Schema]]) -> None:
    """Columns of the same name have types that merge across files; the error names the column and both files."""
    seen: dict[str, tuple[pa.DataType, str]] = {}
    for path, found in schemas:
        for f in found:
            if f.name not in seen or pa.types.is_null(seen[f.name][0]):
                seen[f.name] = (f.type, path)
                continue
            other, where = seen[f.name]
            try:
                pa.unify_schemas([pa.schema([(f.name, other)]), pa.schema([f])], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                raise SourceError(
                    f"{path}: column {f.name!r} has type {f.type}, but {other} in {where}; the files cannot be "
                    "read as one dataset"
                ) from None


def read(shard: InputShard, text_column: str, id_column: str, storage=None) -> pa.Table:
    """The shard as a table with ``id`` (given or ``<key>:<row>``), ``text`` and the file's other columns."""
    try:
        table = _read_raw(shard, storage)
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
    given = id_column in table.column_names
    return pa.table(
        [ids, text] + [table.column(c) for c in rest], names=[schema.ID, schema.TEXT] + rest,
        metadata={IDS_KEY: b"given" if given else b"generated"},
    )


def check_unique_ids(table: pa.Table, shard: InputShard) -> None:
    """A ``SourceError`` naming the id and both rows when an id repeats inside one shard."""
    ids = table.column(schema.ID)
    if pc.count_distinct(ids).as_py() == table.num_rows:
        return
    first: dict[str, int] = {}
    for row, value in enumerate(ids.to_pylist()):
        if value in first:
            raise SourceError(f"{shard.path}: rows {first[value]} and {row}: duplicate id {value!r} (column 'id')")
        first[value] = row


def _open_file(shard: InputShard, storage):
    filesystem, inner = fs.resolve(shard.path, storage)
    return filesystem.open_input_file(inner)


def _open_stream(shard: InputShard, storage):
    """A binary stream of a JSONL file, decompressed by suffix (``.gz``, ``.zst``)."""
    filesystem, inner = fs.resolve(shard.path, storage)
    codec = "gzip" if inner.endswith(".gz") else "zstd" if inner.endswith(".zst") else None
    return filesystem.open_input_stream(inner, compression=codec)


def _lines(stream):
    """The lines of a binary stream, read in 4 MiB chunks (without their newline)."""
    rest = b""
    while chunk := stream.read(1 << 22):
        *lines, rest = (rest + chunk).split(b"\n")
        yield from lines
    if rest:
        yield rest


def _read_raw(shard: InputShard, storage) -> pa.Table:
    if shard.format == "parquet":
        with _open_file(shard, storage) as f:
            return pq.read_table(f)
    if shard.format == "hf":
        with _open_file(shard, storage) as f:
            return pa.ipc.open_stream(f).read_all()
    rows = []
    with _open_stream(shard, storage) as f:
        for line_no, line in enumerate(_lines(f), start=1):
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
