"""Structured omegaconf configs: load a YAML file, apply dotted overrides, validate against a dataclass.

Every top-level config (``RunConfig`` here, the trainer's ``TrainConfig``) goes through :func:`load`, so
unknown keys and wrong types fail the same way, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


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
        fingerprint: ``sha256`` of every input file, or ``stat`` (size + mtime) for very large inputs.
        group_column: column whose values are counted in and out (kept share per domain in the report).
        read_num_cpus: CPUs per read task (when the first stage has ``compute: tasks``, the read runs inside
            its tasks and takes that stage's ``num_cpus``).
    """

    paths: list[str] = MISSING
    format: str = "auto"
    text_column: str = "text"
    id_column: str = "id"
    keep_columns: list[str] | None = None
    on_invalid: str = "error"
    max_doc_chars: int = 10_000_000
    fingerprint: str = "sha256"
    group_column: str | None = "domain"
    read_num_cpus: float = 0.5


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
    rows_per_shard: int = 50_000
    drop_columns: list[str] = field(default_factory=lambda: ["embedding"])
    overwrite: bool = False
    report: bool = True
    part_compression: str = "none"


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
    num_cpus: int | None = None
    object_store_memory: int | None = 2_000_000_000
    preserve_order: bool = True
    target_block_mb: float = 16.0


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
    ray: RayConfig = field(default_factory=RayConfig)


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
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"{where}: required key(s) not set: {', '.join(missing)}")
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"{where}: {_first_line(e)}") from None
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (what ``--dry-run`` prints and the manifest records)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def check_choice(where: str, value: Any, choices: tuple) -> None:
    """A ``ConfigError`` naming the key ``where`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")


def validate_params(params_cls: type, values: dict, where: str) -> Any:
    """Validate one stage's parameters against its dataclass; returns a typed ``DictConfig``."""
    try:
        return OmegaConf.merge(OmegaConf.structured(params_cls), values)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    msg = lines[0] if lines else type(e).__name__
    key = getattr(e, "full_key", None)
    return f"{msg} (key: {key})" if key and key not in msg else msg
