"""Human report of a snapshot: ``<snapshot>/report/index.md`` with PNG plots beside it.

Sections: the run (inputs, rows kept, time), the stages (rows in/out, seconds, statistics, a timing
chart), kept share per group (``source.group_column``, from the input counts in the manifest; counts only
for other group columns such as ``source``), a histogram of every ``*_score`` column and of every column a
select stage thresholded (threshold from that stage's ``stats``), token-weight distributions, and the
first/last examples of every score and selection rank.

The snapshot holds only kept rows, so histograms show kept documents; pass ``pool`` (parquet files with
every row once, before selection, e.g. a run's first-segment parts) to draw the whole scored pool too.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tokensift.pipeline import fs, schema
from tokensift.pipeline import report_plots as plots

N_EXAMPLES = 3
EXCERPT_CHARS = 200
MAX_WEIGHT_TOKENS = 2_000_000  # token weights read for the distribution plot (documents in shard order)


def write_report(snapshot_dir: str | Path, pool: list[str] | None = None, manifest: dict | None = None,
                 storage=None) -> Path | str:
    """Write ``<snapshot_dir>/report/`` (replacing an older one) and return the path (or URI) of ``index.md``.

    Args:
        snapshot_dir: a snapshot (``manifest.json`` + ``data/``), a local path or a URI.
        pool: optional parquet files holding every scored row before selection.
        manifest: the snapshot's manifest when it is not written yet (a run writes it last, after the report).
        storage: the run's storage options, for URIs.
    """
    snap = str(snapshot_dir)
    if manifest is None:
        path = fs.join(snap, "manifest.json")
        if not fs.is_file(path, storage):
            raise FileNotFoundError(f"{path}: missing; is {snap} a tokensift snapshot?")
        manifest = fs.read_json(path, storage)
    shards = [fs.join(snap, s["file"]) for s in manifest.get("shards", [])]
    missing = [p for p in shards if not fs.is_file(p, storage)]
    if missing:
        raise FileNotFoundError(f"{snap}: shard(s) listed in the manifest are missing: {missing}")
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        index = _write_sections(snap, manifest, shards, pool, out, storage)
        target = fs.join(snap, "report")
        fs.delete(target, storage)
        for f in sorted(out.iterdir()):
            fs.write_bytes(fs.join(target, f.name), f.read_bytes(), storage)
    index = fs.join(target, index.name)
    return index if fs.is_uri(index) else Path(index)


def _write_sections(snap: str, manifest: dict, shards: list[str], pool, out: Path, storage) -> Path:
    columns = manifest.get("columns") or {}
    table = _scalars(shards, columns, manifest, storage)
    sections = [
        _run(manifest, snap),
        _stages(manifest, out),
        _groups(manifest, table, out),
        _scores(manifest, table, out, pool, storage),
        _weights(shards, out, storage) if schema.TOKEN_WEIGHTS in columns else "",
        _examples(table, shards, columns, storage),
    ]
    index = out / "index.md"
    index.write_text("\n\n".join(s for s in sections if s) + "\n")
    return index


# ---------------------------------------------------------------- data


def _group_columns(manifest: dict, columns: dict) -> list[str]:
    configured = ((manifest.get("config") or {}).get("source") or {}).get("group_column")
    return [c for c in dict.fromkeys([configured, "domain", "source"]) if c and c in columns]


def _thresholds(manifest: dict) -> dict[str, list[tuple[str, float]]]:
    """Score column -> [(stage label, threshold)] from the select stages' statistics."""
    out: dict[str, list[tuple[str, float]]] = {}
    for st in manifest.get("stages", []):
        stats, params = st.get("stats") or {}, st.get("params") or {}
        column = stats.get("column") or params.get("column")
        if column and isinstance(stats.get("threshold"), int | float):
            out.setdefault(column, []).append((_label(st), float(stats["threshold"])))
    return out


def _score_columns(manifest: dict, columns: dict) -> list[str]:
    named = [c for c in columns if c.endswith("_score")] + list(_thresholds(manifest))
    numeric = ("float", "double", "int", "uint", "halffloat")
    return [c for c in dict.fromkeys(named) if c in columns and columns[c].startswith(numeric)]


def _rank_columns(columns: dict) -> list[str]:
    return [c for c in columns if c.endswith("_rank")]


def _scalars(shards: list[str], columns: dict, manifest: dict, storage) -> pa.Table:
    """Id, group, score and rank columns of every kept row (small: one value per row each)."""
    wanted = [schema.ID, *_group_columns(manifest, columns), *_score_columns(manifest, columns),
              *_rank_columns(columns)]
    wanted = [c for c in dict.fromkeys(wanted) if c in columns or c == schema.ID]
    if not shards:
        return pa.table({c: pa.array([], pa.string()) for c in wanted})
    return pa.concat_tables([fs.read_table(p, wanted, storage) for p in shards])


def _numbers(column: pa.ChunkedArray) -> np.ndarray:
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    return values[~np.isnan(values)]


# ---------------------------------------------------------------- sections


def _run(manifest: dict, snap: str) -> str:
    inputs = manifest.get("inputs", [])
    read = sum(i.get("rows_read", 0) for i in inputs)
    skipped = sum(sum((i.get("skipped") or {}).values()) for i in inputs)
    rows = manifest.get("rows", 0)
    kept = f"{rows:,} of {read:,} read ({_pct(rows, read)})" if read else f"{rows:,}"
    config = manifest.get("config") or {}
    where = fs.name((config.get("output") or {}).get("path") or snap)  # snap may be the unpublished dir
    lines = [
        f"# tokensift report: {config.get('name', where)}",
        "",
        f"- snapshot: `{where}`, created {manifest.get('created_at', '?')} "
        f"by tokensift {manifest.get('tokensift_version', '?')}",
        f"- documents kept: {kept}; skipped as invalid: {skipped:,}",
        f"- input files: {len(inputs)}; output shards: {len(manifest.get('shards', []))}",
        f"- wall time: {_fmt(manifest.get('seconds'))} s",
    ]
    if manifest.get("tokenizer"):
        lines.append(f"- tokenizer: `{json.dumps(manifest['tokenizer'])}`")
    return "\n".join(lines)


def _stages(manifest: dict, out: Path) -> str:
    stages = manifest.get("stages", [])
    if not stages:
        return "## Stages\n\nNo stages: the snapshot is the source as read."
    lines = ["## Stages", "", "| stage | kind | rows in | rows out | kept | seconds | statistics |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for st in stages:
        stats = ", ".join(f"{k}={_fmt(v)}" for k, v in (st.get("stats") or {}).items()
                          if isinstance(v, int | float | str | type(None)))
        lines.append(f"| {_label(st)} | {st.get('kind', '')} | {st.get('rows_in', 0):,} | "
                     f"{st.get('rows_out', 0):,} | {_pct(st.get('rows_out', 0), st.get('rows_in', 0))} | "
                     f"{_fmt(st.get('seconds'))} | {_cell(stats)} |")
    labels, seconds = [_label(st) for st in stages], [float(st.get("seconds") or 0) for st in stages]
    plots.bars(out / "timings.png", labels, seconds, "compute seconds per stage", "seconds",
               notes=[f"{s:.3g} s" for s in seconds])
    lines += ["", "Map-stage seconds are summed over actors (compute time, not wall time).", "",
              "![seconds per stage](timings.png)"]
    return "\n".join(lines)


def _groups(manifest: dict, table: pa.Table, out: Path) -> str:
    groups = [c for c in _group_columns(manifest, manifest.get("columns") or {}) if c in table.column_names]
    if not groups:
        return ""
    configured = ((manifest.get("config") or {}).get("source") or {}).get("group_column")
    totals: Counter = Counter()
    for inp in manifest.get("inputs", []):
        totals.update(inp.get("groups") or {})
    parts = ["## Kept documents per group"]
    for col in groups:
        kept = Counter(str(v) for v in table.column(col).to_pylist())
        total = dict(totals) if col == configured and totals else None
        names = sorted(set(kept) | set(total or {}))
        if total:
            rows = [(g, kept[g], total.get(g, 0)) for g in names]
            lines = [f"### {col}", "", f"| {col} | kept | input | kept share |", "| --- | ---: | ---: | ---: |"]
            lines += [f"| {_cell(g)} | {k:,} | {n:,} | {_pct(k, n)} |" for g, k, n in rows]
            plots.bars(out / f"kept_{col}.png", names, [k / n if n else 0.0 for _, k, n in rows],
                       f"kept share per {col}", "kept share", notes=[f"{k:,}/{n:,}" for _, k, n in rows],
                       xlim=(0, 1))
        else:
            lines = [f"### {col}", "", f"Input counts per {col} are not in the manifest: kept counts only.", "",
                     f"| {col} | kept |", "| --- | ---: |"]
            lines += [f"| {_cell(g)} | {kept[g]:,} |" for g in names]
            plots.bars(out / f"kept_{col}.png", names, [kept[g] for g in names], f"kept documents per {col}",
                       "documents", notes=[f"{kept[g]:,}" for g in names])
        parts.append("\n".join(lines + ["", f"![kept per {col}](kept_{col}.png)"]))
    return "\n\n".join(parts)


def _scores(manifest: dict, table: pa.Table, out: Path, pool: list[str] | None, storage) -> str:
    cols = [c for c in _score_columns(manifest, manifest.get("columns") or {}) if c in table.column_names]
    if not cols:
        return ""
    thresholds = _thresholds(manifest)
    parts = ["## Scores"]
    for col in cols:
        kept = _numbers(table.column(col))
        everything = _pool_values(pool, col, storage)
        plots.histogram(out / f"score_{col}.png", kept, col, everything, thresholds.get(col, []))
        q = np.quantile(kept, [0, 0.5, 1]) if kept.size else None
        line = f"### {col}\n\nkept: " + (
            f"{kept.size:,} documents, min {q[0]:.4g}, median {q[1]:.4g}, max {q[2]:.4g}" if kept.size else "none")
        if everything is not None:
            line += f"; all scored: {everything.size:,}, median {np.median(everything):.4g}"
        for label, x in thresholds.get(col, []):
            line += f"; threshold of {label}: {x:.4g}"
        parts.append(f"{line}\n\n![{col}](score_{col}.png)")
    return "\n\n".join(parts)


def _pool_values(pool: list[str] | None, col: str, storage) -> np.ndarray | None:
    files = [p for p in pool or [] if col in fs.parquet_file(p, storage).schema_arrow.names]
    if not files:
        return None
    return _numbers(pa.concat_tables([fs.read_table(p, [col], storage) for p in files]).column(col))


def _weights(shards: list[str], out: Path, storage) -> str:
    weights, means, n_docs, n_tokens = [], [], 0, 0
    for path in shards:
        if n_tokens >= MAX_WEIGHT_TOKENS:
            break
        for batch in fs.parquet_file(path, storage).iter_batches(columns=[schema.TOKEN_WEIGHTS]):
            col = batch.column(0)
            lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy()
            values = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float64)
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            nonempty = lengths > 0
            means.append(np.add.reduceat(values, starts[nonempty]) / lengths[nonempty] if values.size else [])
            weights.append(values)
            n_docs, n_tokens = n_docs + len(lengths), n_tokens + values.size
            if n_tokens >= MAX_WEIGHT_TOKENS:
                break
    w, m = np.concatenate(weights) if weights else np.zeros(0), np.concatenate(means) if means else np.zeros(0)
    if not w.size:
        return "## Token weights\n\nThe `token_weights` column is empty."
    plots.token_weights(out / "token_weights.png", w, m)
    lines = [
        "## Token weights", "",
        f"Over {n_docs:,} documents and {w.size:,} tokens"
        + (" (the first ones: the column is large)" if w.size >= MAX_WEIGHT_TOKENS else "") + ":", "",
        "| mean | min | max | share = 0 | share = 1 | mean per document (median) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {w.mean():.4g} | {w.min():.4g} | {w.max():.4g} | {np.mean(w == 0):.1%} | {np.mean(w == 1):.1%} "
        f"| {np.median(m):.4g} |",
        "", "![token weights](token_weights.png)",
    ]
    return "\n".join(lines)


def _examples(table: pa.Table, shards: list[str], columns: dict, storage) -> str:
    """Highest/lowest rows of every score column and first/last picks of every rank column."""
    if not table.num_rows or schema.TEXT not in columns:
        return ""
    ids = table.column(schema.ID).to_pylist()
    lists: list[tuple[str, str, list[int]]] = []
    for col in [c for c in table.column_names if c.endswith("_score") or c.endswith("_rank")]:
        values = table.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
        valid = np.flatnonzero(~np.isnan(values))
        order = valid[np.lexsort((np.asarray(ids, dtype=object)[valid].astype(str), values[valid]))]
        low, high = order[:N_EXAMPLES].tolist(), order[::-1][:N_EXAMPLES].tolist()
        if col.endswith("_rank"):
            lists += [(col, "first picked", low), (col, "last picked", high)]
        else:
            lists += [(col, "highest", high), (col, "lowest", low)]
    texts = _texts({ids[i] for _, _, rows in lists for i in rows}, shards, storage)
    parts = [f"## Examples\n\nExcerpts: first {EXCERPT_CHARS} characters, whitespace collapsed."]
    for col, title, rows in lists:
        lines = [f"### {col}: {title}", "", f"| id | {col} | excerpt |", "| --- | ---: | --- |"]
        lines += [f"| `{_cell(ids[i])}` | {_fmt(table.column(col)[i].as_py())} | {_cell(texts.get(ids[i], ''))} |"
                  for i in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _texts(wanted: set[str], shards: list[str], storage) -> dict[str, str]:
    """Excerpts of the wanted ids, streaming ``id``/``text`` batch by batch."""
    found: dict[str, str] = {}
    value_set = pa.array(sorted(wanted), pa.string())
    for path in shards:
        for batch in fs.parquet_file(path, storage).iter_batches(columns=[schema.ID, schema.TEXT]):
            hit = batch.filter(pc.is_in(batch.column(0), value_set=value_set))
            for i, t in zip(hit.column(0).to_pylist(), hit.column(1).to_pylist(), strict=True):
                found[i] = " ".join((t or "")[: EXCERPT_CHARS * 2].split())[:EXCERPT_CHARS]
            if len(found) == len(wanted):
                return found
    return found


# ---------------------------------------------------------------- formatting


def _label(stage: dict) -> str:
    return f"{stage.get('index', '?')}: {stage.get('name', '?')}"


def _pct(part: float, whole: float) -> str:
    return f"{part / whole:.1%}" if whole else "–"


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or isinstance(v, str):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4g}"


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return re.sub(r"\s+", " ", str(text)).replace("|", "\\|").replace("<", "&lt;")
