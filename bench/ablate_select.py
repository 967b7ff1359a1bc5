"""Equal-token-budget selection arms: the pool, the target split, configs run through the pipeline, the cut.

A selector returns the pool's document ids in its own order (descending score, or a seeded permutation for
random); :func:`budget_cut` keeps the shortest prefix of that order whose tokens reach the common token
budget, so every arm trains on the same number of tokens from snapshots of (almost) the same size. Selector
configs live in ``examples/ablate/`` (the harness only sets paths and budgets).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.ablate_train import write_snapshot
from tokensift.config import RunConfig, load, to_yaml
from tokensift.pipeline import schema

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "ablate"
SAMPLE = ROOT / "sample_data"
DOMAINS = ("news", "math", "code", "instruction")
SOURCE_COLUMNS = ["id", "text", "domain", "source", "prompt", "response"]


def id_hash(doc_id: str) -> int:
    """A stable integer of an id (sha256), used for seeded-free, order-free splits."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")


def read_split(heldout: bool, domains=DOMAINS) -> pa.Table:
    """The sample corpus' train (or heldout) rows of ``domains``, in file order."""
    base = SAMPLE / "heldout" if heldout else SAMPLE
    missing = [d for d in domains if not (base / f"{d}.parquet").is_file()]
    if missing:
        raise FileNotFoundError(f"sample corpus incomplete: {base}/{missing[0]}.parquet (run `tokensift sample-data`)")
    return pa.concat_tables([pq.read_table(base / f"{d}.parquet", columns=SOURCE_COLUMNS) for d in domains])


def target_split(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Heldout rows of the target domain in two disjoint halves by id hash: (targets, evaluation).

    Targets steer SIFT (queries) and ICon (assessment set); evaluation rows are only ever scored.
    """
    odd = np.array([id_hash(i) % 2 == 1 for i in table.column("id").to_pylist()])
    return table.filter(pa.array(odd)), table.filter(pa.array(~odd))


def sample_rows(table: pa.Table, n: int | None, seed: int) -> pa.Table:
    """``n`` rows drawn without replacement (kept in table order); all rows when ``n`` is None or larger."""
    if n is None or n >= table.num_rows:
        return table
    pick = np.sort(np.random.default_rng(seed).choice(table.num_rows, n, replace=False))
    return table.take(pa.array(pick))


def budget_cut(order: list[str], tokens: dict[str, int], budget: int) -> list[str]:
    """The shortest prefix of ``order`` whose token count reaches ``budget`` (all of it if it never does).

    Args:
        order: document ids, best first (repeats are ignored after the first).
        tokens: tokens of every document.
        budget: tokens to reach.
    """
    kept, seen, total = [], set(), 0
    for doc in order:
        if doc in seen:
            continue
        if doc not in tokens:
            raise KeyError(f"budget_cut: id {doc!r} is not in the pool")
        seen.add(doc)
        kept.append(doc)
        total += tokens[doc]
        if total >= budget:
            break
    return kept


def run_config(name: str, overrides: list[str], refresh: bool = False) -> Path:
    """Run ``examples/ablate/<name>.yaml`` with ``overrides``; reuse the snapshot when its config is unchanged."""
    from tokensift.pipeline.runner import run

    cfg = load(RunConfig, CONFIGS / f"{name}.yaml", overrides)
    out = Path(cfg.output.path)
    manifest = out / "manifest.json"
    if not refresh and manifest.is_file() and json.loads(manifest.read_text()).get("config_yaml") == to_yaml(cfg):
        return out
    return run(cfg, restart=True)  # a stale .partial of another config is discarded


def read_snapshot(path: Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(Path(path) / "data", columns=columns)


def ranked_by_score(snapshot: Path, column: str) -> list[str]:
    """Ids of a snapshot by descending ``column`` (ties by id)."""
    t = read_snapshot(snapshot, [schema.ID, column])
    ids, scores = t.column(schema.ID).to_pylist(), t.column(column).to_numpy(zero_copy_only=False)
    return [ids[i] for i in np.lexsort((np.array(ids, dtype=object).astype(str), -scores))]


class Pool:
    """A selection pool as a byte-token snapshot (``examples/ablate/pool.yaml``): each document's tokens and
    domain, the common token budget, and budget-cut snapshots of any order.

    Args:
        work: working directory (the pool snapshot and its source file).
        table: the pool's rows (sample corpus columns).
        budget_share: token budget as a share of the pool's tokens.
        overrides: more config overrides (e.g. the prompt and response columns of an SFT pool).
        refresh: recompute the snapshot even when its config is unchanged.
    """

    def __init__(self, work: Path, table: pa.Table, budget_share: float = 0.15, overrides: tuple[str, ...] = (),
                 refresh: bool = False):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.source = self.work / "pool_source.parquet"
        pq.write_table(table, self.source)
        self.path = run_config("pool", [f"source.paths=[{self.source}]", f"output.path={self.work / 'pool'}", *overrides],
                               refresh)
        t = read_snapshot(self.path, [schema.ID, "n_tokens", "domain"])
        self.ids = t.column(schema.ID).to_pylist()
        self.tokens = dict(zip(self.ids, t.column("n_tokens").to_pylist(), strict=True))
        self.domain = dict(zip(self.ids, t.column("domain").to_pylist(), strict=True))
        self.budget = int(math.ceil(budget_share * sum(self.tokens.values())))

    def info(self) -> dict:
        return {"pool_docs": len(self.ids), "pool_tokens": sum(self.tokens.values()), "budget": self.budget}

    def random(self, seed: int) -> list[str]:
        return [self.ids[i] for i in np.random.default_rng(seed).permutation(len(self.ids))]

    def snapshot(self, order: list[str], out: Path, budget: int | None = None) -> dict:
        """Write the cut of ``order`` at ``budget`` tokens (default: the pool's budget) as a snapshot (``data/``
        shard + ``manifest.json``); returns its stats."""
        budget = self.budget if budget is None else budget
        kept = budget_cut(order, self.tokens, budget)
        t = read_snapshot(self.path)
        rows = {doc: i for i, doc in enumerate(self.ids)}
        t = t.take(pa.array([rows[d] for d in kept]))
        tokens = sum(self.tokens[d] for d in kept)
        share = {d: sum(self.tokens[k] for k in kept if self.domain[k] == d) / max(tokens, 1) for d in DOMAINS}
        stats = {"docs": len(kept), "tokens": tokens, "budget": budget, "reached": tokens >= budget,
                 "domain_share": share}
        write_snapshot(t, out, source=str(self.path), selection=stats)
        return stats
