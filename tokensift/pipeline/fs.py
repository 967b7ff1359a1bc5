"""Paths and URIs on any filesystem: local paths, ``s3://``, ``gs://``, ``hdfs://`` (``pyarrow.fs``).

Every path tokensift reads or writes goes through :func:`resolve`, which returns a ``pyarrow.fs.FileSystem``
and the path inside it. Credentials and endpoints come from the standard environment, as boto3 and pyarrow
users expect (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``), and
from the run's ``storage`` config block for the rest. Filesystems are resolved again inside each Ray
worker (from the URI and the storage options), so no credential travels in a task's arguments.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "file")


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` paths (a Windows drive letter is not a scheme)."""
    return "://" in str(path) and len(str(path).split("://", 1)[0]) > 1


def is_local(path: str) -> bool:
    return not is_uri(path) or str(path).startswith("file://")


def resolve(path: str, storage: Any = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or a URI.

    Args:
        path: ``/a/b``, ``rel/b``, ``~/b``, ``file:///a/b``, ``s3://bucket/key``, ``gs://...``, ``hdfs://...``.
        storage: the run's ``storage`` options (``endpoint_url``, ``region``, ``anonymous``); the
            environment fills in what it leaves unset.
    """
    path = str(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    url = urlparse(path)
    scheme = url.scheme.lower()
    if scheme == "file":
        return pafs.LocalFileSystem(), url.path
    if scheme == "s3":
        return _s3(*_s3_options(storage)), f"{url.netloc}{url.path}".rstrip("/")
    if scheme not in SCHEMES:
        raise ValueError(f"{path}: unsupported filesystem scheme {scheme!r} (use a local path, s3://, gs:// or hdfs://)")
    fs, inner = pafs.FileSystem.from_uri(path)
    return fs, inner.rstrip("/")


def _s3_options(storage: Any) -> tuple:
    get = (lambda k: getattr(storage, k, None)) if storage is not None else (lambda k: None)
    endpoint = get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return endpoint, region, bool(get("anonymous"))


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None, anonymous: bool) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"anonymous": anonymous}
    if region:
        kwargs["region"] = region
    if endpoint:
        url = urlparse(endpoint)
        kwargs["endpoint_override"] = url.netloc or url.path
        kwargs["scheme"] = url.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` keeping ``base``'s scheme (a URI stays a URI, a local path stays local)."""
    base = str(base)
    if is_uri(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def parent(path: str) -> str:
    path = str(path).rstrip("/")
    return path.rsplit("/", 1)[0] if is_uri(path) else os.path.dirname(os.path.abspath(os.path.expanduser(path)))


def name(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def normalize(path: str) -> str:
    """A canonical form for comparing locations: absolute local paths, ``scheme://bucket/key`` URIs."""
    if not is_uri(path):
        return os.path.realpath(os.path.expanduser(str(path)))
    url = urlparse(str(path))
    return f"{url.scheme.lower()}://{url.netloc}{posixpath.normpath(url.path or '/')}".rstrip("/")


def overlaps(a: str, b: str) -> bool:
    """True when location ``a`` is, contains or is inside location ``b``."""
    a, b = normalize(a), normalize(b)
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def info(path: str, storage: Any = None) -> pafs.FileInfo:
    fs, inner = resolve(path, storage)
    return fs.get_file_info(inner)


def exists(path: str, storage: Any = None) -> bool:
    return info(path, storage).type != pafs.FileType.NotFound


def is_file(path: str, storage: Any = None) -> bool:
    return info(path, storage).type == pafs.FileType.File


def read_bytes(path: str, storage: Any = None) -> bytes:
    fs, inner = resolve(path, storage)
    with fs.open_input_stream(inner) as f:
        return f.read()


def write_bytes(path: str, data: bytes, storage: Any = None) -> None:
    """Write ``data`` so that readers never see a partial file.

    Local: a temporary sibling renamed into place. Object stores: one PUT, atomic by the store's contract.
    """
    fs, inner = resolve(path, storage)
    try:
        fs.create_dir(posixpath.dirname(inner) if is_uri(path) else os.path.dirname(inner), recursive=True)
        if not isinstance(fs, pafs.LocalFileSystem):
            with fs.open_output_stream(inner) as f:
                f.write(data)
            return
        tmp = f"{inner}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, inner)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:  # pyarrow's messages ("Error writing bytes to file") name no file
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def read_json(path: str, storage: Any = None) -> Any:
    return json.loads(read_bytes(path, storage))


def write_json(path: str, obj: Any, storage: Any = None) -> None:
    write_bytes(path, json.dumps(obj, indent=2, default=str).encode(), storage)


def listdir(path: str, storage: Any = None, recursive: bool = False) -> list[pafs.FileInfo]:
    """Entries under ``path`` (empty when it does not exist), sorted by path."""
    fs, inner = resolve(path, storage)
    entries = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True, recursive=recursive))
    return sorted(entries, key=lambda e: e.path)


def delete(path: str, storage: Any = None) -> None:
    """Remove a file or a whole directory tree; nothing when it does not exist."""
    fs, inner = resolve(path, storage)
    kind = fs.get_file_info(inner).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(inner)
    elif kind == pafs.FileType.File:
        fs.delete_file(inner)
    elif not isinstance(fs, pafs.LocalFileSystem):  # object stores have no directories: drop the prefix
        fs.delete_dir_contents(inner, missing_dir_ok=True)


def uri_of(fs: pafs.FileSystem, inner: str, like: str) -> str:
    """The URI (or local path) of ``inner`` on the filesystem that ``like`` resolved to."""
    if not is_uri(like):
        return inner
    return f"{urlparse(like).scheme}://{inner}"


def read_table(path: str, columns: list[str] | None = None, storage: Any = None):
    """A Parquet file (or its ``columns``) as an Arrow table."""
    import pyarrow.parquet as pq

    filesystem, inner = resolve(path, storage)
    return pq.read_table(inner, columns=columns, filesystem=filesystem)


def parquet_file(path: str, storage: Any = None):
    """A ``pq.ParquetFile`` over any filesystem (for metadata, row groups and batch iteration)."""
    import pyarrow.parquet as pq

    filesystem, inner = resolve(path, storage)
    return pq.ParquetFile(filesystem.open_input_file(inner))
