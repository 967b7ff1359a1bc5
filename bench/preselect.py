"""PreSelect scoring + top-10 % selection end to end against raw fastText ``predict``, documents/s per core.

Pool: the shipped sample corpus (news, math, code, instruction; real text) repeated to n documents in 8
Parquet shards with 1,000-row row groups (as HF datasets' ``to_parquet`` and DataTrove write them). Full mode
measures 200,000 and 1,000,000 documents: Ray's fixed costs (actor start-up, first read, publishing) weigh
on the smaller run, the larger one shows the streaming rate. Model: a fastText classifier with PreSelect's settings (epoch 3, lr 0.1, wordNgrams 2,
dim 100; bucket 200,000 instead of 2,000,000 to keep the file at ~80 MB) trained on part of the corpus.

- ours (end to end): ``runner.run`` of ``[preselect, score_threshold top_p=0.1 by chars]`` with PreSelect's
  default resources (task compute inside the read tasks, 1 CPU each), from Parquet to a published snapshot,
  on the embedded local Ray (started before the clock: a cluster is up before a job), documents / (wall
  seconds x Ray CPUs).
- ours (stage): the same run's ``preselect`` compute seconds from the manifest, per worker.
- anchor, all cores (the per-core throughput the target is about): raw ``model.predict(list, k=-1)`` run in
  one process per Ray CPU at once, each over its share of the pool's texts already in memory (newlines
  replaced off the clock), documents / (slowest process's seconds x processes). Measured just before and just
  after ours, and averaged, so that the VM's drift during the run weighs on both sides alike.
- anchor, one process: the same ``predict`` over all texts in one process, the other cores idle (it has the
  L3 cache and memory bandwidth to itself; it also converts every text in one call). Reported for comparison.
- the driver's own cost: its CPU seconds and the bytes it received (``manifest["driver"]``, counted by the
  runner: Ray results, fragment records, metadata files) per million documents, beside the CPU seconds the
  whole machine spent during the run (``/proc/stat``) and the input's Parquet bytes. The driver coordinates and
  the workers move the data: both stay small however many rows pass.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SHARDS = 8


def _corpus() -> pa.Table:
    from tokensift.data.sample import build_sample

    sample = ROOT / "sample_data"
    if not (sample / "manifest.json").is_file():
        build_sample(sample)
    return pa.concat_tables([pq.read_table(p, columns=["id", "text", "domain"]) for p in sorted(sample.glob("*.parquet"))])


def _pool(corpus: pa.Table, n: int, out: Path) -> list[str]:
    """``n`` documents cycling through the corpus, with unique ids, in SHARDS Parquet files."""
    idx = np.arange(n) % corpus.num_rows
    table = corpus.take(pa.array(idx)).set_column(0, "id", pa.array([f"doc{i:07d}" for i in range(n)]))
    out.mkdir(parents=True)
    for s, lo in enumerate(range(0, n, -(-n // SHARDS))):
        pq.write_table(table.slice(lo, -(-n // SHARDS)), out / f"pool-{s:02d}.parquet", row_group_size=1000)
    return table.column("text").to_pylist()


def run(quick: bool = False) -> list[dict]:
    from tokensift.selectors.fasttext_text import FastTextParams, train_classifier

    corpus = _corpus()
    with tempfile.TemporaryDirectory(prefix="bench-preselect-") as tmp:
        tmp = Path(tmp)
        texts = corpus.column("text").to_pylist()
        domains = corpus.column("domain").to_pylist()
        model = train_classifier(
            texts[::2], ["1" if d == "news" else "0" for d in domains[::2]], tmp / "m.bin", FastTextParams(bucket=200_000)
        )
        rows = []
        for n in [10_000] if quick else [200_000, 1_000_000]:
            rows += measure(n, corpus, model, tmp / f"n{n}")
    return rows


def _lines(texts: Iterable[str]) -> list[str]:
    """Texts as fastText scores them (newlines replaced: fastText rejects them)."""
    from tokensift.selectors.fasttext_text import normalise

    return [normalise(t) for t in texts]


def _predict_timed(paths: list[Path], model: str, barrier, results) -> None:
    """One anchor process: load its texts and the model, wait for the others, time ``predict``."""
    import fasttext

    lines = _lines(t for p in paths for t in pq.read_table(p, columns=["text"]).column("text").to_pylist())
    raw = fasttext.load_model(model)
    barrier.wait()
    t0 = time.perf_counter()
    raw.predict(lines, k=-1)
    results.put((len(lines), time.perf_counter() - t0))


def anchor_all_cores(paths: list[Path], model: Path, cores: int) -> float:
    """Raw fastText ``predict`` docs/s per core with ``cores`` processes at once, each on its share of ``paths``."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(cores), ctx.Queue()
    procs = [ctx.Process(target=_predict_timed, args=(paths[k::cores], str(model), barrier, results)) for k in range(cores)]
    for p in procs:
        p.start()
    done = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(n for n, _ in done) / max(t for _, t in done) / cores


def anchor_one_process(texts: list[str], model: Path) -> float:
    """Raw fastText ``predict`` docs/s over ``texts`` in this process alone."""
    import fasttext

    lines, raw = _lines(texts), fasttext.load_model(str(model))
    t0 = time.perf_counter()
    raw.predict(lines, k=-1)
    return len(lines) / (time.perf_counter() - t0)


def measure(n: int, corpus: pa.Table, model: Path, tmp: Path) -> list[dict]:
    """The end-to-end and stage rows for a pool of ``n`` documents of ``corpus`` (files under ``tmp``)."""
    import ray

    from tokensift.config import RunConfig, load
    from tokensift.pipeline import runner
    from tokensift.pipeline.ray_env import ensure_ray

    pool = _pool(corpus, n, tmp / "pool")
    paths = sorted((tmp / "pool").glob("*.parquet"))
    one = anchor_one_process(pool, model)

    started = not ray.is_initialized()
    ensure_ray(None, 2, 1_000_000_000)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    before = anchor_all_cores(paths, model, cpus)
    cfg = load(RunConfig, None, [
        f"source.paths=[{tmp}/pool/*.parquet]",
        f"output.path={tmp}/snap",
        "output.report=false",
        f"stages=[{{stage: preselect, model: {model}}},"
        " {stage: score_threshold, column: preselect_score, top_p: 0.1, weight: chars}]",
    ])
    busy0, t0 = _machine_cpu_seconds(), time.perf_counter()
    out = runner.run(cfg)
    wall, busy = time.perf_counter() - t0, _machine_cpu_seconds() - busy0
    after = anchor_all_cores(paths, model, cpus)
    manifest = json.loads((out / "manifest.json").read_text())
    if started:
        ray.shutdown()
    anchor = (before + after) / 2
    stage_seconds = manifest["stages"][0]["seconds"]
    ours_e2e, ours_stage = n / wall / cpus, n / stage_seconds
    kept = manifest["stages"][1]["rows_out"]
    driver, per_m = manifest["driver"], 1e6 / n
    input_bytes = sum(p.stat().st_size for p in paths)
    common = f"{n:,} real docs ({sum(map(len, pool)) / n:,.0f} chars avg)"
    e2e = f"ours = docs / (runner wall {wall:.1f} s x {cpus} Ray CPUs), kept {kept} docs"
    return [
        {
            "measure": f"PreSelect end to end, parquet -> top-10% snapshot, docs/s per core ({common})",
            "ours": round(ours_e2e, 1),
            "anchor": round(anchor, 1),
            "unit": "docs/s/core",
            "ratio": round(ours_e2e / anchor, 2),
            "note": f"ratio = ours / anchor; {e2e}; anchor = fastText predict(list) on in-memory texts in {cpus} "
            f"processes at once, per core: {before:,.0f} before ours, {after:,.0f} after, mean",
        },
        {
            "measure": f"PreSelect end to end against predict in one process alone ({common})",
            "ours": round(ours_e2e, 1),
            "anchor": round(one, 1),
            "unit": "docs/s/core",
            "ratio": round(ours_e2e / one, 2),
            "note": f"ratio = ours / anchor; {e2e}; anchor = fastText predict(list) in one process, other cores idle",
        },
        {
            "measure": f"PreSelect map stage alone, docs/s per worker ({common})",
            "ours": round(ours_stage, 1),
            "anchor": round(anchor, 1),
            "unit": "docs/s/core",
            "ratio": round(ours_stage / anchor, 2),
            "note": f"ratio = ours / anchor (all cores); ours = docs / preselect stage compute seconds ({stage_seconds:.1f} s) "
            "from the manifest (normalise + exact P(label 1) + Arrow column)",
        },
        {
            "measure": f"PreSelect chain: driver CPU-s per 1M docs vs the whole machine's ({common})",
            "ours": round(driver["cpu_seconds"] * per_m, 2),
            "anchor": round(busy * per_m, 1),
            "unit": "CPU-s/1M docs",
            "ratio": round(driver["cpu_seconds"] / busy, 3),
            "note": f"ratio = driver share of all CPU; ours = the driver process's CPU time ({driver['cpu_seconds']:.2f} s "
            f"over {wall:.0f} s wall, of which its main thread, tokensift's own work: {driver['main_thread_cpu_seconds']:.2f} s; "
            f"the rest is Ray's client threads) for the whole run; anchor = busy CPU-seconds of every process on the "
            f"machine ({busy:.1f} s, /proc/stat)",
        },
        {
            "measure": f"PreSelect chain: bytes the driver received per 1M docs vs the input's bytes ({common})",
            "ours": round(driver["bytes_received"] * per_m),
            "anchor": round(input_bytes * per_m),
            "unit": "bytes/1M docs",
            "ratio": round(driver["bytes_received"] / input_bytes, 5),
            "note": f"ratio = ours / anchor; ours = Ray results, fragment records and metadata files the driver read "
            f"({driver['bytes_received']:,} B); anchor = the input Parquet files ({input_bytes:,} B)",
        },
    ]


def _machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (user + nice + system + irq + softirq in /proc/stat)."""
    import os

    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
