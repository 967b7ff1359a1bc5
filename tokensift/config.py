"""Structured omegaconf configs: load a YAML file, apply dotted overrides, validate against a dataclass.

Every top-level config (``RunConfig`` here, the trainer's ``TrainConfig``) goes through :func:`load`, and
every stage's params through :func:`validate_params`, so unknown keys, wrong types, values outside a
field's declared choices or range, and broken cross-field rules fail the same way, before any work starts.
A dataclass field declares its allowed values in its metadata, checked by :func:`check_fields`::

    on_invalid: str = field(default="error", metadata={"choices": ("error", "skip")})
    top_p: float = field(default=0.1, metadata={"gt": 0, "le": 1})      # also "ge" and "lt"

and a dataclass may define ``check(self)`` for rules across fields, raising ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PART_CODECS = ("none", "zstd", "lz4", "snappy")  # Parquet codecs of the per-shard parts
# metadata key -> (test the value must pass against the bound, how the message says it)
BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the file."""


@dataclass
class SourceConfig:
    """Where documents come from.

    Args:
        paths: files, directories or globs; Parquet, JSONL (plain, .gz, .zst) or HF ``save_to_disk`` dirs.
        format: ``auto`` (by suffix / directory content), ``parquet``, ``jsonl`` or ``hf``.
        text_column: the column holding the document text.
        id_column: the column holding a stable id; when absent, ``<path>:<row>`` is used.
        keep_columns: extra source columns carried to the snapshot (``None``: all of them).
        on_invalid: ``error`` (one clear error, nothing published) or ``skip`` (counted in the manifest)
            for null text, non-UTF-8 text and documents over ``max_doc_chars``.
        max_doc_chars: longest document accepted.
        fingerprint: how inputs are identified for the manifest and resume checks: ``stat`` (size + mtime)
            or ``sha256`` of every input file's bytes.
        group_column: column whose values are counted in and out (kept share per domain in the report).
        read_num_cpus: CPUs per read task (when the first stage has ``compute: tasks``, the read runs inside
            its tasks and takes that stage's ``num_cpus``).
    """

    paths: list[str] = MISSING
    format: str = field(default="auto", metadata={"choices": ("auto", "parquet", "jsonl", "hf")})
    text_column: str = "text"
    id_column: str = "id"
    keep_columns: list[str] | None = None
    on_invalid: str = field(default="error", metadata={"choices": ("error", "skip")})
    max_doc_chars: int = field(default=10_000_000, metadata={"gt": 0})
    fingerprint: str = field(default="stat", metadata={"choices": ("stat", "sha256")})
    group_column: str | None = "domain"
    read_num_cpus: float = field(default=0.5, metadata={"gt": 0})


@dataclass
class OutputConfig:
    """Where and how the snapshot is written.

    Args:
        path: snapshot directory (must not exist unless ``overwrite``).
        rows_per_shard: rows per ``data/train-XXXXX-of-YYYYY.parquet`` shard.
        drop_columns: columns removed before writing (embeddings are large).
        overwrite: replace an existing snapshot at ``path``.
        report: write ``report/`` (markdown + plots) into the snapshot.
        part_compression: Parquet codec of the per-shard parts in ``<path>.partial/``, temporary files the
            driver writes as rows stream in and the snapshot writer reads back. ``none`` makes that
            single-process sink about 6x cheaper in CPU per byte, for temporary disk about the size of the
            rows in memory; ``zstd``, ``lz4`` or ``snappy`` trade that CPU for disk. The snapshot itself is
            always compressed.
    """

    path: str = MISSING
    rows_per_shard: int = field(default=50_000, metadata={"gt": 0})
    drop_columns: list[str] = field(default_factory=lambda: ["embedding"])
    overwrite: bool = False
    report: bool = True
    part_compression: str = field(default="none", metadata={"choices": PART_CODECS})


@dataclass
class RayConfig:
    """Where the job runs.

    Args:
        address: ``None`` starts an embedded local Ray in-process; ``auto`` or ``ray://host:10001`` joins
            an existing cluster.
        num_cpus: CPUs of the embedded Ray (``None``: all of this machine's).
        object_store_memory: bytes for the embedded Ray's object store.
        preserve_order: keep row order through Ray Data (needed for reproducible snapshots).
        target_block_mb: Ray Data's ``target_max_block_size`` in MiB. Smaller than Ray's 128 MiB default, so
            that the object-store budget of a model stage admits a task per actor (with 128 MiB blocks of
            long documents, one actor of a pool worked while the others waited).
    """

    address: str | None = None
    num_cpus: int | None = field(default=None, metadata={"gt": 0})
    object_store_memory: int | None = field(default=2_000_000_000, metadata={"gt": 0})
    preserve_order: bool = True
    target_block_mb: float = field(default=16.0, metadata={"gt": 0})


@dataclass
class StorageConfig:
    """How URIs (``s3://``, ``gs://``, ``hdfs://``) are reached; the standard environment fills in the rest.

    Credentials come from the environment as boto3 and pyarrow users expect (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, an instance role...), never from a config file.

    Args:
        endpoint_url: S3-compatible endpoint, e.g. ``http://127.0.0.1:9000`` (default ``$AWS_ENDPOINT_URL``).
        region: S3 region (default ``$AWS_REGION``).
        anonymous: read public buckets without credentials.
    """

    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False


@dataclass
class RunConfig:
    """A selection job: a source, a list of stages, a snapshot.

    ``stages`` is a list of mappings ``{stage: <registered name>, <params>...}``; each is validated against
    the stage's own params dataclass (see ``tokensift.pipeline.registry``).
    """

    name: str = "tokensift"
    seed: int = 0
    source: SourceConfig = field(default_factory=SourceConfig)
    stages: list[Any] = field(default_factory=list)
    output: OutputConfig = field(default_factory=OutputConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def check(self) -> None:
        """Every stage entry names a registered stage with valid params and resources."""
        from tokensift.pipeline.registry import resolve

        resolve(self.stages)


def load(schema: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Load ``path`` (YAML) over the defaults of ``schema`` and apply ``key.sub=value`` overrides.

    Returns a typed ``DictConfig``. Unknown keys, wrong types and missing required values raise
    :class:`ConfigError` naming the key.
    """
    where = str(path) if path else "defaults"
    try:
        cfg = OmegaConf.structured(schema)
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not of the form key.sub=value")
            for o in overrides:  # update, not merge: keys may index lists (stages.1.top_p=0.2)
                key, value = o.split("=", 1)
                OmegaConf.update(cfg, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=True)
        _require_all_set(cfg, where)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"{where}: {_first_line(e)}") from None
    try:
        check_fields(cfg, schema)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (what ``--dry-run`` prints and the manifest records)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def check_choice(where: str, value: Any, choices: tuple) -> None:
    """A ``ConfigError`` naming the key ``where`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")


def check_fields(cfg: DictConfig, schema: type, where: str = "") -> None:
    """Check ``cfg`` against the field metadata of the dataclass ``schema``, then its ``check`` hook.

    Metadata ``choices`` (allowed values) and bounds ``ge``, ``gt``, ``le``, ``lt`` are checked; ``None``
    (an unset optional field) passes, a list is checked item by item, a nested dataclass field recursively.

    Args:
        cfg: the merged config of ``schema``.
        schema: the dataclass whose fields' metadata and ``check(self)`` (cross-field rules, raising
            ``ValueError``) apply.
        where: the key prefix for messages, e.g. ``source`` or ``stages[1] (score_threshold)``.
    """
    for f in dataclasses.fields(schema):
        key = f"{where}.{f.name}" if where else f.name
        try:
            value = cfg[f.name]  # resolves interpolations, which may fail
        except OmegaConfBaseException as e:
            raise ConfigError(f"{key}: {_first_line(e)}") from None
        if isinstance(value, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(value)):
            check_fields(value, OmegaConf.get_type(value), key)
        elif isinstance(value, ListConfig):
            for i, item in enumerate(value):
                _check_value(f"{key}[{i}]", item, f.metadata)
        else:
            _check_value(key, value, f.metadata)
    if hasattr(schema, "check"):
        try:
            schema.check(cfg)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def _check_value(key: str, value: Any, meta: Any) -> None:
    if value is None:
        return
    if "choices" in meta:
        check_choice(key, value, meta["choices"])
    for name, (passes, sign) in BOUNDS.items():
        if name in meta and not passes(value, meta[name]):
            raise ConfigError(f"{key}: {value} is not {sign} {meta[name]}")


def validate_params(params_cls: type, values: dict, where: str) -> Any:
    """Validate one stage's parameters against its dataclass (types, metadata, ``check``); returns a typed
    ``DictConfig``."""
    try:
        params = OmegaConf.merge(OmegaConf.structured(params_cls), values)
        _require_all_set(params, where)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {_first_line(e)}") from None
    check_fields(params, params_cls, where)
    return params


def _require_all_set(cfg: DictConfig, where: str) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{where}: required key(s) not set: {', '.join(missing)}")


def _first_line(e: Exception) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    msg = lines[0] if lines else type(e).__name__
    key = getattr(e, "full_key", None)
    return f"{msg} (key: {key})" if key and key not in msg else msg
