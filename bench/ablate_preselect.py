"""Part 1 of ``python -m bench.ablate``: PreSelect with a real model family (Shum et al. 2025).

1. Family: ``bench.ablate_family``, four byte GPTs trained here (two sizes, three mixtures), and SmolLM2-135M.
2. Benchmark b_i: model i's bits per character on the target domain's held-out documents (the steering
   half; the other half evaluates), negated so that higher is better.
3. Losses: bits per character of ``scored`` pool documents (each cut to its first 255 bytes) under every
   model; predictive strength S(d) = the number of model pairs whose loss order agrees with their benchmark
   order (``tokensift.selectors.preselect``), S_max = 10 for 5 models.
4. Labels: S = S_max positives and as many lowest-S negatives. The labelled documents split 80/20 by id
   hash; fastText (the paper's settings, bucket shrunk) trains on the 80 % and is scored on the 20 %.
5. Selection: the pipeline's ``preselect`` stage scores the whole pool with that classifier; its top
   documents up to the token budget vs random draws of the same budget, each trained into the same GPT
   (``examples/ablate/train.yaml``) for ``steps`` steps per seed; held-out bits per byte per domain.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench import ablate_report as r

TITLE = "1. PreSelect with a real model family"
TARGET = "math"
SEEDS = 3
FULL = {"pool_docs": None, "scored": 1200, "family_share": 1.0, "steps": 150, "eval_batches": 40}
QUICK = {"pool_docs": 600, "scored": 120, "family_share": 0.25, "steps": 20, "eval_batches": 6}


def run(quick: bool, work: Path, log=print) -> dict:
    from bench.ablate_family import train_family
    from bench.ablate_select import DOMAINS, Pool, read_split, sample_rows, target_split
    from bench.ablate_train import arm_bits, eval_snapshots
    from tokensift.models.assets import smollm2

    size, work = QUICK if quick else FULL, Path(work)
    pool = Pool(work, sample_rows(read_split(False), size["pool_docs"], seed=0))
    family = train_family(pool, work / "family", size["family_share"], log)
    models = {name: f["model"] for name, f in family.items()}
    models["smollm2-135m"] = smollm2()
    steering = target_split(read_split(True, [TARGET]))[0].column("text").to_pylist()
    scored = sample_rows(pq.read_table(pool.source, columns=["id", "text"]), size["scored"], seed=1)
    t0 = time.time()
    bench = {name: -float(np.mean(_bpc(m, steering))) for name, m in models.items()}
    losses = {name: _bpc(m, scored.column("text").to_pylist()) for name, m in models.items()}
    log(f"preselect: benchmark and {scored.num_rows} documents under {len(models)} models in {time.time() - t0:.0f} s")
    labels = _classifier(scored, losses, bench, work / "preselect.bin")
    order = _ranking(pool, work)
    evals = eval_snapshots(work, TARGET, DOMAINS)
    arms = {}
    for arm in ("random", "preselect"):
        runs = []
        for seed in range(SEEDS):
            snap = work / "snap" / f"{arm}-s{seed}"
            stats = pool.snapshot(pool.random(seed) if arm == "random" else order, snap)
            runs.append({**arm_bits(snap, work / "train" / f"{arm}-s{seed}", seed, [f"max_steps={size['steps']}"],
                                    evals, size["eval_batches"]), "snapshot": stats})
        arms[arm] = runs
        log(f"preselect: arm {arm} trained ({SEEDS} seeds)")
    info = {n: {"params": sum(p.numel() for p in (m[0] if isinstance(m, tuple) else m).parameters()),
                "steps": family[n]["steps"] if n in family else None, "focus": family.get(n, {}).get("focus"),
                "benchmark_bpc": -bench[n]} for n, m in models.items()}
    return {"size": size, "target": TARGET, "pool": pool.info(), "seeds": SEEDS, "domains": list(DOMAINS),
            "models": info, "labels": labels, "arms": arms}


def _bpc(model, texts: list[str]) -> np.ndarray:
    from bench.ablate_family import bits_per_char, cut, gpt_nll, hf_nll

    texts = [cut(t) for t in texts]
    nll = hf_nll(*model, texts) if isinstance(model, tuple) else gpt_nll(model, texts)
    return bits_per_char(nll, texts)


def _classifier(scored: pa.Table, losses: dict, bench: dict, out: Path) -> dict:
    """Label the scored documents, train fastText on 80 % of the labelled ones, score the other 20 %."""
    from bench.ablate_select import id_hash
    from tokensift.selectors.fasttext_text import FastTextParams, FastTextScorer, train_classifier
    from tokensift.selectors.preselect import label_documents

    ids, texts = scored.column("id").to_pylist(), scored.column("text").to_pylist()
    names = list(losses)
    labels = label_documents(ids, np.column_stack([losses[n] for n in names]), [bench[n] for n in names])
    rows = np.concatenate([labels.positives, labels.negatives])
    y = np.r_[np.ones(len(labels.positives), int), np.zeros(len(labels.negatives), int)]
    test = np.array([id_hash(ids[i]) % 5 == 0 for i in rows])
    train_classifier([texts[i] for i in rows[~test]], [str(v) for v in y[~test]], out, FastTextParams(bucket=100_000))
    p = FastTextScorer(out).proba([texts[i] for i in rows[test]])
    return {**labels.stats, "strength_mean": float(labels.strength[labels.strength >= 0].mean()),
            "strength_std": float(labels.strength[labels.strength >= 0].std(ddof=1)),
            "test_docs": int(test.sum()), "test_accuracy": float(np.mean((p >= 0.5) == (y[test] == 1))),
            "test_majority": float(max(y[test].mean(), 1 - y[test].mean()))}


def _ranking(pool, work: Path) -> list[str]:
    from bench.ablate_select import ranked_by_score, run_config

    snap = run_config("preselect", [f"source.paths=[{pool.path / 'data'}/*.parquet]",
                                    f"output.path={work / 'select' / 'preselect'}",
                                    f"stages.0.model={work / 'preselect.bin'}"], refresh=True)
    return ranked_by_score(snap, "preselect_score")


def section(data: dict) -> list[str]:
    size, lab, models, domains, target = data["size"], data["labels"], data["models"], data["domains"], data["target"]
    bench_rows = [[n, f"{m['params']:,}", "pretrained (shipped)" if m["steps"] is None else
                   f"{m['steps']} steps, {'general mix' if m['focus'] is None else m['focus'] + '-heavy mix'}",
                   f"{m['benchmark_bpc']:.3f}"] for n, m in models.items()]
    hist = lab["strength_histogram"]
    lines = [
        f"Family: {len(models)} causal LMs; the GPTs (byte tokens) trained here on mixtures of the pool "
        f"({data['pool']['pool_docs']:,} documents of the corpus' general mix), SmolLM2-135M as shipped. "
        f"Benchmark: bits per character on the steering half of heldout/{target} (lower = better model). "
        f"Predictive strength S on {lab['documents']:,} pool documents (first 255 bytes each), "
        f"S_max = {lab['max_strength']}.", "",
        *r.table(["model", "parameters", "training", f"{target} bits/char (benchmark)"], bench_rows), "",
        f"S histogram (S = 0..{lab['max_strength']}): {hist}; mean {lab['strength_mean']:.2f} ± "
        f"{lab['strength_std']:.2f}. Positives (S = S_max): {lab['positives']}; negatives: {lab['negatives']} "
        f"(highest negative S: {lab['negative_max_strength']}). fastText held-out accuracy on "
        f"{lab['test_docs']} labelled documents: {lab['test_accuracy']:.3f} (majority class "
        f"{lab['test_majority']:.3f}).", "",
        f"Equal token budget: {data['pool']['budget']:,} byte tokens (15 % of the pool) per snapshot; the GPT "
        f"of `examples/ablate/train.yaml` trained {size['steps']} steps per seed, {data['seeds']} seeds; "
        f"held-out bits per byte (target: the evaluation half of heldout/{target}), mean ± std over seeds.", "",
    ]
    header = ["arm", "% tokens " + " / ".join(domains), *[f"{d} bits/byte" for d in domains], "mean",
              f"{target} vs random", "mean vs random"]
    return lines + r.table(header, r.budget_rows(data["arms"], domains, (target, "mean")))
