"""``tokensift run CONFIG [key=value ...]``: run a selection job and write a snapshot."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (see examples/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides applied after the file")
    p.add_argument(
        "--address",
        help="run on an existing Ray cluster ('auto' inside a job, or ray://host:10001); default: embedded local Ray",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config, check inputs and stages, run nothing")
    p.add_argument("--restart", action="store_true", help="discard an interrupted run's parts instead of resuming")


def main(args: argparse.Namespace) -> int:
    from tokensift.config import RunConfig, load, to_yaml
    from tokensift.pipeline import runner

    overrides = list(args.overrides) + ([f"ray.address={args.address}"] if args.address else [])
    cfg = load(RunConfig, args.config, overrides)
    if args.dry_run:
        entries, shards, columns = runner.plan(cfg)
        print(to_yaml(cfg), end="")
        print(f"# {len(shards)} input file(s); source columns: {', '.join(columns)}")
        print(f"# stages: {' -> '.join(e.spec.name for e in entries) or '(none)'}")
        return 0
    try:
        out = runner.run(cfg, restart=args.restart)
    except OSError as e:
        if e.filename is None and e.strerror:  # e.g. a full disk while writing: say where the run writes
            raise OSError(e.errno, e.strerror, cfg.output.path) from e
        raise
    print(summary(str(out), cfg.storage))
    return 0


def summary(snapshot: str, storage=None) -> str:
    """What a finished run made, from its manifest: documents kept, the stage chain, tokens weighted (when the
    snapshot has ``token_weights``; reads that column), and where the snapshot and its report are.

    Args:
        snapshot: the published snapshot (local path or URI).
        storage: storage options for URIs.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from tokensift.pipeline import fs

    m = fs.read_json(fs.join(snapshot, "manifest.json"), storage)
    read = sum(i.get("rows_read", 0) for i in m["inputs"])
    lines = [f"snapshot written: {snapshot}", f"  documents: {m['rows']:,} kept of {read:,} read"]
    if m["stages"]:
        lines.append("  stages:    " + " -> ".join(f"{s['name']} ({s['rows_out']:,})" for s in m["stages"]))
    if "token_weights" in m.get("columns", {}):
        tokens = weighted = 0
        for shard in m["shards"]:
            filesystem, inner = fs.resolve(fs.join(snapshot, shard["file"]), storage)
            weights = pc.list_flatten(pq.read_table(inner, columns=["token_weights"], filesystem=filesystem)[0])
            tokens, weighted = tokens + len(weights), weighted + pc.sum(pc.greater(weights, 0)).as_py()
        lines.append(f"  tokens:    {weighted:,} of {tokens:,} weighted > 0 (token_weights)")
    report = fs.join(snapshot, "report", "index.md")
    if fs.is_file(report, storage):
        lines.append(f"  report:    {report}")
    return "\n".join(lines)
