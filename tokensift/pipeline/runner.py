"""Run a selection job: source -> map stages -> select stages -> snapshot, on Ray Data.

The embedded default starts a local Ray in this process; ``ray.address`` (or ``--address``) runs the very
same job against a cluster. Everything the job needs is checked before any work starts: the config, the
inputs (they exist, open, have the text column), the output location and the column contract of every stage.

The driver coordinates and the workers move the data: read tasks read the input shards, the last stage of
each segment writes fragments to the work directory (``tokensift.pipeline.fragments``), one task per segment
runs Ray Data's executor and commits the shards (``tokensift.pipeline.commit``), select stages run in Ray
tasks (``tokensift.pipeline.selection``), publish tasks write the snapshot files
(``tokensift.pipeline.publish``). The driver handles the plan, one marker per shard and the manifest: its
work grows with the number of shards, never with rows or blocks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from functools import partial
from pathlib import Path

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from tokensift import failures
from tokensift.config import ConfigError, to_yaml
from tokensift.pipeline import driver_io, fs, publish, registry, schema, sources, unique
from tokensift.pipeline.commit import stream_markers
from tokensift.pipeline.fragments import TIME_PREFIX, FragmentSink
from tokensift.pipeline.registry import StageEntry
from tokensift.pipeline.resources import check_plan
from tokensift.pipeline.segments import read_kept_rows, read_source_shard, segment_dataset
from tokensift.pipeline.selection import Keep, keep_of, run_select
from tokensift.pipeline.workdir import WorkDir

log = logging.getLogger("tokensift")
HEARTBEAT_SECONDS = 60


def plan(cfg) -> tuple[list[StageEntry], list[sources.InputShard], list[str]]:
    """Validate stages, inputs, output location and the column contract; returns (stages, shards, columns)."""
    entries = registry.resolve(cfg.stages)
    storage = cfg.storage
    shards = sources.expand(list(cfg.source.paths), cfg.source.format, storage)
    schemas = [(s.path, sources.check(s, cfg.source.text_column, storage)) for s in shards]
    sources.check_compatible(schemas)
    names = schemas[0][1].names
    check_output(cfg, shards)
    keep = cfg.source.keep_columns
    columns = [schema.ID, schema.TEXT, schema.N_CHARS] + [
        c for c in (keep if keep is not None else names)
        if c not in (cfg.source.text_column, cfg.source.id_column, schema.N_CHARS)
    ]
    check_contract(entries, columns)
    return entries, shards, columns


def check_output(cfg, shards: list[sources.InputShard]) -> None:
    """The output location never is, contains or lies inside an input; ``overwrite`` replaces only a snapshot."""
    out = cfg.output.path
    inputs = [sources.base_of(p) for p in cfg.source.paths] + [s.path for s in shards]
    for where in (out, f"{out.rstrip('/')}.partial"):
        clash = next((i for i in inputs if fs.overlaps(where, i)), None)
        if clash is not None:
            raise ConfigError(
                f"output.path {out!r}: {where} overlaps the input {clash!r}; write the snapshot somewhere "
                "that is not, does not contain and is not inside an input"
            )
    if fs.exists(out, cfg.storage):
        if not cfg.output.overwrite:
            raise FileExistsError(f"{out} exists; set output.overwrite=true to replace it")
        if not fs.is_file(fs.join(out, publish.MANIFEST), cfg.storage):
            raise FileExistsError(
                f"{out} exists and is not a tokensift snapshot (no {publish.MANIFEST}); output.overwrite replaces "
                "only a previous snapshot, so remove it yourself or choose another output.path"
            )


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
        if e.spec.kind == "select" and getattr(e.spec.cls, "ranked", True):
            have[schema.rank_column(e.spec.name)] = e.label


def run(cfg, restart: bool = False) -> Path | str:
    """Run ``cfg`` (a ``RunConfig``) and return the published snapshot (a ``Path``, or the URI)."""
    started, driver = time.time(), driver_io.DriverIO()
    entries, shards, _ = plan(cfg)
    storage = OmegaConf.to_object(cfg.storage)
    out = cfg.output.path if fs.is_uri(cfg.output.path) else str(Path(cfg.output.path).expanduser().resolve())
    inputs = [sources.fingerprint(s, storage) for s in tqdm(shards, desc="inputs", unit="file", disable=len(shards) < 100)]
    work = WorkDir(out, _digest(inputs), storage, restart=restart)
    try:
        from tokensift.pipeline.ray_env import ensure_ray

        ensure_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory)
        import ray

        read = cfg.source.read_num_cpus
        check_plan(entries, read, ray.cluster_resources(), later_read_cpus=read)  # no silent hang: fail here
        segments = _split(entries)
        if work.keep_segments(_segment_fingerprints(cfg, segments)) and work.markers(0):
            log.warning("resuming the interrupted run in %s", work.root)
        job = _Job(cfg, work, storage, shards)
        stage_reports, keep = [], None
        for seg, (maps, select) in enumerate(segments):
            markers = job.segment(seg, maps, keep)
            if seg == 0:
                job.check_ids(markers)
            stage_reports += _map_reports(maps, markers)
            if select is not None:
                report, keep = job.select(seg, select, markers)
                stage_reports.append(report)
        result = job.publish(segments, inputs, stage_reports, entries, started, driver)
    except Exception as e:  # Ray wraps stage and source errors; surface the original one
        raise (failures.original(e) or e) from None
    finally:
        work.unlock()
    return result


class _Job:
    """The driver's side of one run: segments, selections and publishing over a work directory."""

    def __init__(self, cfg, work: WorkDir, storage, shards: list[sources.InputShard]):
        self.cfg, self.work, self.storage, self.shards = cfg, work, storage, shards
        self.beat = time.time()

    def segment(self, seg: int, maps: list[StageEntry], keep: Keep | None) -> dict[int, dict]:
        """Run segment ``seg`` over its uncommitted shards; returns every shard's marker."""
        done = self.work.markers(seg)
        pending = [s.index for s in self.shards if s.index not in done]
        if not pending:
            return done
        self.work.drop_uncommitted(seg, pending)
        segment, src = self.work.segment(seg), self.cfg.source
        if seg == 0:
            by_index = {s.index: s for s in self.shards}
            hashes = src.fingerprint == "sha256"
            reads = [(partial(read_source_shard, by_index[i], src, segment, self.storage, hashes), by_index[i].path)
                     for i in pending]
        else:
            previous = self.work.markers(seg - 1)
            reads = [(partial(read_kept_rows, i, self._files(seg - 1, i, previous[i]), keep, segment, self.storage),
                      self.work.shard_dir(seg - 1, i)) for i in pending]
        sink = FragmentSink(segment, self.storage, self.cfg.output.part_compression)
        dataset = partial(segment_dataset, reads, maps, sink, src.read_num_cpus, int(self.cfg.ray.target_block_mb * 2**20))
        shards = {i: (self.work.shard_dir(seg, i), self.work.marker_path(seg, i)) for i in pending}
        with tqdm(total=len(pending), desc=f"segment {seg}", unit="shard") as bar:
            for shard, marker in stream_markers(dataset, shards, self.storage, self._beat):
                done[shard] = marker
                bar.update(1)
        return done

    def _beat(self) -> None:
        """Refresh the work directory's lock every ``HEARTBEAT_SECONDS`` while a segment runs."""
        if time.time() - self.beat > HEARTBEAT_SECONDS:
            self.work.heartbeat()
            self.beat = time.time()

    def check_ids(self, markers: dict[int, dict]) -> None:
        """Ids given by the source are unique across shards (inside a shard, the read task checked them)."""
        given = [(i, fs.join(self.work.shard_dir(0, i), unique.HASHES), m["source"]["id_hash_offsets"])
                 for i, m in sorted(markers.items()) if "id_hash_offsets" in m["source"]]
        fragments = {i: self._files(0, i, markers[i]) for i, _, _ in given}
        paths = {s.index: s.path for s in self.shards}
        unique.check_across_shards(given, fragments, paths.get, self.storage)

    def _files(self, seg: int, shard: int, marker: dict) -> list[str]:
        return [fs.join(self.work.shard_dir(seg, shard), f["file"]) for f in marker["fragments"]]

    def select(self, seg: int, e: StageEntry, markers: dict[int, dict]) -> tuple[dict, Keep]:
        """Run select stage ``e`` over segment ``seg`` (or take its recorded result when resuming)."""
        path, report_path = self.work.selection_path(seg), self.work.selection_report(seg)
        ranked = schema.rank_column(e.spec.name) if getattr(e.spec.cls, "ranked", True) else None
        if fs.is_file(report_path, self.storage):
            report = driver_io.read_json(report_path, self.storage)
            return report, keep_of(path, ranked, report.pop("rule", None), self.storage)
        files = [self._files(seg, s.index, markers[s.index]) for s in self.shards]
        result, keep = run_select(e, files, path, self.storage)
        report = {"index": e.index, "name": e.spec.name, "kind": "select",
                  "params": OmegaConf.to_container(e.params), **result}
        fs.write_json(report_path, dict(report, rule=keep.rule), self.storage)
        return report, keep

    def publish(self, segments, inputs: list[dict], stage_reports: list[dict], entries, started: float,
                driver: driver_io.DriverIO) -> Path | str:
        """Publish tasks write the data files; the driver writes the manifest last; local outputs are renamed."""
        last = len(segments) - 1
        markers = self.work.markers(last)
        fragments = [(f, m["rows"]) for s in self.shards for f, m in
                     zip(self._files(last, s.index, markers[s.index]), markers[s.index]["fragments"], strict=True)]
        out, local = self.work.out, fs.is_local(self.work.out)
        root = self.work.path("final") if local else out
        if local:
            fs.delete(root)
        else:
            _unpublish(out, self.storage)
        shards, target = publish.publish_data(fragments, root, self.cfg.output, self.storage)
        seg0 = self.work.markers(0)
        run_info = {
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "config_yaml": to_yaml(self.cfg),
            "inputs": [dict(fp, **{k: v for k, v in seg0[s.index]["source"].items() if k != "id_hash_offsets"})
                       for s, fp in zip(self.shards, inputs, strict=True)],
            "stages": stage_reports,
            "tokenizer": _tokenizer(entries),
            "seconds": round(time.time() - started, 3),
        }
        run_info["driver"] = driver.summary()  # the coordinator's own cost: CPU seconds, bytes received
        manifest = publish.manifest(run_info, shards, target)
        if self.cfg.output.report:
            pool = None
            if last:  # the scored rows before the last selection, for the report's histograms
                before = self.work.markers(last - 1)
                pool = [f for s in self.shards for f in self._files(last - 1, s.index, before[s.index])]
            _report(root, manifest, pool, self.storage)
        fs.write_json(fs.join(root, publish.MANIFEST), manifest, self.storage)
        if not local:
            fs.delete(self.work.root, self.storage)
            return out
        old = self.work.path("old")
        if fs.exists(out):
            Path(out).rename(old)
        Path(root).rename(out)
        fs.delete(self.work.root)
        return Path(out)


def _unpublish(out: str, storage) -> None:
    """Before an object-store snapshot is replaced: its manifest first (readers stop trusting it), then its files."""
    fs.delete(fs.join(out, publish.MANIFEST), storage)
    fs.delete(out, storage)


def _report(root: str, manifest: dict, pool: list[str] | None, storage) -> None:
    """The human report, written by a Ray task."""
    import ray

    from tokensift.pipeline.report import write_report

    driver_io.get(ray.remote(write_report).options(num_cpus=1).remote(root, pool, manifest, storage))


def _map_reports(maps: list[StageEntry], markers: dict[int, dict]) -> list[dict]:
    rows = sum(m["rows"] for m in markers.values())
    return [
        {
            "index": e.index, "name": e.spec.name, "kind": "map", "params": OmegaConf.to_container(e.params),
            "rows_in": rows, "rows_out": rows,
            "seconds": round(sum(m["seconds"].get(f"{TIME_PREFIX}{e.index}", 0.0) for m in markers.values()), 3),
        }
        for e in maps
    ]


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


def _segment_fingerprints(cfg, segments) -> list[str]:
    """Segment k's config: the source and every stage that shapes its fragments (not its own select stage)."""
    source = OmegaConf.to_container(cfg.source, resolve=True)
    stages = OmegaConf.to_container(cfg.stages, resolve=True)
    out, upto = [], 0
    for maps, select in segments:
        upto += len(maps)
        out.append(_digest([source, stages[:upto]]))
        upto += select is not None
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tokenizer(entries: list[StageEntry]) -> dict | None:
    for e in entries:
        if e.spec.name == "tokenize":
            return {k: v for k, v in OmegaConf.to_container(e.params).items() if k in ("tokenizer", "gguf_file", "add_eos", "max_length")}
    return None
