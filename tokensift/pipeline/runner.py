"""Run a selection job: source -> map stages -> select stages -> snapshot, on Ray Data.

The embedded default starts a local Ray in this process; ``ray.address`` (or ``--address``) runs the very
same job against a cluster. Everything the job needs is checked before any work starts: the config, the
inputs (they exist, open, have the text column) and the column contract of every stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from tokensift.config import ConfigError, check_choice, to_yaml
from tokensift.pipeline import registry, schema, snapshot, sources
from tokensift.pipeline.registry import StageEntry
from tokensift.pipeline.segments import (
    TIME_PREFIX,
    add_map_stages,
    keep_selected,
    read_cpus,
    shard_datasource,
    stream_to_parts,
)
from tokensift.pipeline.workdir import CODECS, WorkDir, write_json, write_parquet

log = logging.getLogger("tokensift")


def plan(cfg) -> tuple[list[StageEntry], list[sources.InputShard], list[str]]:
    """Validate stages, inputs and the column contract; returns (stages, shards, source columns)."""
    entries = registry.resolve(cfg.stages)
    shards = sources.expand(list(cfg.source.paths), cfg.source.format)
    names = sources.check(shards[0], cfg.source.text_column)
    for shard in shards[1:]:
        sources.check(shard, cfg.source.text_column)
    check_choice("output.part_compression", cfg.output.part_compression, CODECS)
    keep = cfg.source.keep_columns
    columns = [schema.ID, schema.TEXT, schema.N_CHARS] + [
        c for c in (keep if keep is not None else names)
        if c not in (cfg.source.text_column, cfg.source.id_column, schema.N_CHARS)
    ]
    check_contract(entries, columns)
    return entries, shards, columns


def check_contract(entries: list[StageEntry], columns: list[str]) -> None:
    """Every stage's needed columns exist by the time it runs; the error names stage and column."""
    have = {c: "source" for c in columns}
    for e in entries:
        missing = [c for c in e.spec.needs(e.params) if c not in have]
        if missing:
            raise ConfigError(
                f"{e.label} needs column(s) {', '.join(missing)}, which nothing before it provides "
                f"(available: {', '.join(have)})"
            )
        for c in e.spec.adds(e.params):
            have[c] = e.label
        if e.spec.kind == "select":
            have[schema.rank_column(e.spec.name)] = e.label


def run(cfg, restart: bool = False) -> Path:
    """Run ``cfg`` (a ``RunConfig``) and return the published snapshot directory."""
    started = time.time()
    entries, shards, _ = plan(cfg)
    out = Path(cfg.output.path).expanduser().resolve()
    if out.exists() and not cfg.output.overwrite:
        raise FileExistsError(f"{out} exists; set output.overwrite=true to replace it")
    inputs = _on_threads(lambda s: sources.fingerprint(s, cfg.source.fingerprint), shards, "fingerprint inputs", "file")
    config_yaml = to_yaml(cfg)
    fingerprint = _fingerprint(cfg, inputs)
    work = WorkDir(out, fingerprint, cfg.output.part_compression, restart=restart)
    if work.resumed:
        log.warning("resuming the interrupted run in %s", work.root)

    from tokensift.pipeline.ray_env import ensure_ray

    ensure_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory)
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = cfg.ray.preserve_order
    context.target_max_block_size = int(cfg.ray.target_block_mb * 2**20)

    stage_reports: list[dict] = []
    source_stats: dict[int, dict] = {}
    segments = _split(entries)
    for seg, (maps, select) in enumerate(segments):
        reports, stats = _run_segment(seg, maps, shards, cfg, work, segments)
        stage_reports += reports
        source_stats.update(stats)
        if select is not None:
            stage_reports.append(_run_select(seg, select, shards, work))

    final = work.final()
    parts = [work.part(len(segments) - 1, s.index) for s in shards]
    manifest = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "config_yaml": config_yaml,
        "config_fingerprint": fingerprint,
        "inputs": [dict(fp, **source_stats.get(s.index, {})) for s, fp in zip(shards, inputs, strict=True)],
        "stages": stage_reports,
        "tokenizer": _tokenizer(entries),
        "seconds": round(time.time() - started, 3),
    }
    pool = [work.part(len(segments) - 2, s.index) for s in shards] if len(segments) > 1 else []
    exists = [p for p in parts if p.is_file()]
    snapshot.write(final, exists, manifest, cfg.output, pool=[p for p in pool if p.is_file()])
    work.publish(final, cfg.output.overwrite)
    return out


def _split(entries: list[StageEntry]) -> list[tuple[list[StageEntry], StageEntry | None]]:
    """Cut the stage list at select stages: [(map stages, select stage or None)]."""
    segments, maps = [], []
    for e in entries:
        if e.spec.kind == "select":
            segments.append((maps, e))
            maps = []
        else:
            maps.append(e)
    segments.append((maps, None))
    return segments


def _run_segment(seg, maps, shards, cfg, work: WorkDir, segments) -> tuple[list[dict], dict]:
    pending = [s.index for s in shards if work.marker(seg, s.index) is None]
    if pending and seg > 0 and not maps:
        _filter_parts(seg, pending, segments[seg - 1][1], work)  # a trailing select needs no Ray pass
    elif pending:
        _stream_segment(seg, maps, pending, shards, cfg, work, segments)
    markers = [work.marker(seg, s.index) for s in shards]
    rows = sum(m["rows"] for m in markers)
    reports = [
        {
            "index": e.index,
            "name": e.spec.name,
            "kind": "map",
            "params": OmegaConf.to_container(e.params),
            "rows_in": rows,
            "rows_out": rows,
            "seconds": round(sum(m.get("seconds", {}).get(f"{TIME_PREFIX}{e.index}", 0.0) for m in markers), 3),
        }
        for e in maps
    ]
    stats = {s.index: m["source"] for s, m in zip(shards, markers, strict=True) if "source" in m}
    return reports, stats


def _kept_ids(seg: int, work: WorkDir) -> pa.Array:
    return pq.read_table(work.selection_path(seg), columns=[schema.ID]).column(schema.ID).combine_chunks()


def _filter_parts(seg: int, pending: list[int], select: StageEntry, work: WorkDir) -> None:
    """Apply select stage ``seg - 1`` to the previous segment's parts, shard by shard, in this process."""
    kept, rank = _kept_ids(seg - 1, work), schema.rank_column(select.spec.name)

    def one(shard: int) -> None:
        prev = work.part(seg - 1, shard)
        table = keep_selected(pq.read_table(prev), kept, rank) if prev.is_file() else None
        _write_part(work, seg, shard, table if table is not None and table.num_rows else None)

    _on_threads(one, pending, f"segment {seg}", "shard")


def _on_threads(fn, items: list, desc: str, unit: str) -> list:
    """``[fn(x) for x in items]`` on one thread per CPU, with a progress bar (hashing and Parquet I/O release the GIL)."""
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit=unit))


def _stream_segment(seg, maps, pending, shards, cfg, work: WorkDir, segments) -> None:
    """Read (source, or selected rows of the previous parts), run the map stages, cut into parts."""
    import ray
    import ray.data

    from tokensift.pipeline.ledger import Ledger

    ledger = Ledger.remote() if seg == 0 else None
    if seg == 0:
        wanted = set(pending)
        todo = [s for s in shards if s.index in wanted]
        ds = ray.data.read_datasource(
            shard_datasource(todo, cfg.source, ledger),
            override_num_blocks=max(len(todo), 1),
            num_cpus=read_cpus(maps, cfg.source.read_num_cpus),
        )
    else:
        select = segments[seg - 1][1]
        paths = [str(work.part(seg - 1, i)) for i in pending if work.part(seg - 1, i).is_file()]
        ds = ray.data.read_parquet(paths) if paths else ray.data.from_items([])
        ds = ds.map_batches(
            keep_selected,
            batch_size=None,
            batch_format="pyarrow",
            fn_kwargs={"kept_ids": _kept_ids(seg - 1, work), "rank_column": schema.rank_column(select.spec.name)},
        )
    ds = add_map_stages(ds, maps)

    def write_part(shard: int, table: pa.Table | None):
        source = ray.get(ledger.get.remote(shard)) if ledger is not None else None
        _write_part(work, seg, shard, table, source)

    try:
        stream_to_parts(ds, pending, write_part, desc=f"segment {seg}")
    except Exception as e:  # Ray wraps stage and source errors; surface the original one
        raise _unwrap(e) from None


def _write_part(work: WorkDir, seg: int, shard: int, table: pa.Table | None, source: dict | None = None) -> None:
    """A shard's part and its completion marker (rows, stage seconds, source statistics)."""
    info: dict = {"rows": 0 if table is None else table.num_rows}
    if source is not None:
        info["source"] = source
    if table is None:
        work.part(seg, shard).parent.mkdir(parents=True, exist_ok=True)
        write_json(work.part(seg, shard).with_suffix(".json"), info)
        return
    info["seconds"] = {c: pc.sum(table.column(c)).as_py() for c in table.column_names if c.startswith(TIME_PREFIX)}
    work.write_part(seg, shard, table, info)


def _run_select(seg: int, e: StageEntry, shards, work: WorkDir) -> dict:
    """Gather the select stage's columns from every part, select, record ids + rank."""
    path = work.selection_path(seg)
    info_path = path.with_suffix(".json")
    if info_path.is_file():
        return json.loads(info_path.read_text())
    columns = [schema.ID] + [c for c in e.spec.needs(e.params) if c != schema.ID]
    parts = [work.part(seg, s.index) for s in shards if work.part(seg, s.index).is_file()]
    table = pa.concat_tables([pq.read_table(p, columns=columns) for p in parts]) if parts else None
    start = time.perf_counter()
    stage = e.spec.cls(OmegaConf.to_object(e.params))
    selection = stage.select(table) if table is not None else None
    seconds = time.perf_counter() - start
    ids = selection.ids if selection else []
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"{e.label} returned an id more than once")
    if table is not None and ids:
        known = pc.is_in(pa.array(ids, pa.string()), value_set=table.column(schema.ID).combine_chunks())
        if not pc.all(known).as_py():
            raise RuntimeError(f"{e.label} returned id(s) not in its input, e.g. {ids[pc.index(known, False).as_py()]!r}")
    scores = selection.scores if selection and selection.scores is not None else [None] * len(ids)
    write_parquet(path, pa.table({schema.ID: pa.array(ids, pa.string()), "score": pa.array(scores, pa.float64())}))
    report = {
        "index": e.index,
        "name": e.spec.name,
        "kind": "select",
        "params": OmegaConf.to_container(e.params),
        "rows_in": 0 if table is None else table.num_rows,
        "rows_out": len(ids),
        "seconds": round(seconds, 3),
        "stats": selection.stats if selection else {},
    }
    write_json(info_path, report)
    return report


def _fingerprint(cfg, inputs: list[dict]) -> str:
    """What a resumed run must share with the interrupted one: config (less overwrite, part codec) and inputs."""
    c = OmegaConf.to_container(cfg, resolve=True)
    c["output"].pop("overwrite", None)
    c["output"].pop("part_compression", None)
    c.pop("ray", None)
    return hashlib.sha256(json.dumps([c, inputs], sort_keys=True, default=str).encode()).hexdigest()


def _tokenizer(entries: list[StageEntry]) -> dict | None:
    for e in entries:
        if e.spec.name == "tokenize":
            return {k: v for k, v in OmegaConf.to_container(e.params).items() if k in ("tokenizer", "gguf_file", "add_eos", "max_length")}
    return None


def _unwrap(e: BaseException) -> BaseException:
    """The user error behind Ray's task wrappers, as its own type with its own one-line message.

    Ray ships a remote error to the driver as text; its first ``pkg.Class: message`` line is the original.
    """
    import ray.exceptions

    if not isinstance(e, ray.exceptions.RayError):
        return e
    match = re.search(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", str(e), flags=re.M)
    if not match:
        return e
    cls, msg = match.group(1).rsplit(".", 1)[-1], match.group(2)
    known = {"SourceError": sources.SourceError, "ConfigError": ConfigError, "ValueError": ValueError,
             "FileNotFoundError": FileNotFoundError, "RuntimeError": RuntimeError}
    return known[cls](msg) if cls in known else RuntimeError(f"{match.group(1)}: {msg}")
