"""Part 6: MoE global- vs micro-batch load balancing and mixture-of-depths, over seeds and a steps sweep.

MoE (Qiu et al. 2025, arXiv 2501.11873): the load-balancing loss ``N_E * sum_i f_i p_i`` with ``f`` counted
over the global batch (all micro-batches of an optimizer step) instead of each micro-batch should let experts
specialise by domain at the same overall balance. ``bench.moe_specialisation``'s data, model, training loop
and metrics, for every swept length x seed x mode (``micro`` / ``global``): NMI(domain; expert), max/mean
expert load and cross-entropy on heldout windows.

MoD (Raposo et al. 2024, arXiv 2404.02258): ``bench.mod``'s byte-level GPT and loop; for every swept length
``N`` and seed: dense for ``N`` steps, MoD for ``N`` steps (equal steps) and MoD for
``round(N * F_dense / F_mod)`` steps (equal training FLOPs; ``F = GPT.flops_per_token``, training = 3 x
forward). Heldout bits per byte with the MoD model's causal (sampling-time) routing.

Verdicts (``bench.ablate_report.verdict``): difference of means over seeds against twice its standard error.
The sweep's answer is, mechanically, the smallest length whose verdict is not "no clear difference".
Runs go to forked single-threaded workers, one per usable core (each run is seeded, so the number of workers
changes only the wall time), and each is appended to ``work/moe.jsonl`` / ``work/mod.jsonl`` as it finishes,
so an interrupted run resumes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.ablate_report import fmt, table, verdict

TITLE = "6. MoE global- vs micro-batch balancing and mixture-of-depths, over a steps sweep"
QUICK = {"seeds": 2, "moe_lengths": [3, 6], "moe_heldout": 4, "mod_lengths": [2, 4], "mod_heldout": 16}
FULL = {"seeds": 5, "moe_lengths": [20, 40, 80], "moe_heldout": 48, "mod_lengths": [10, 20, 40], "mod_heldout": 64}
JOB = ("arm", "length", "seed", "heldout")
MOE_METRICS = {"nmi": ("NMI(domain; expert)", False), "max_load": ("max/mean expert load", True),
               "ce": ("heldout CE (nats/token)", True)}  # key -> (label, lower is better)
MOD_ARMS = ("dense", "mod_equal_steps", "mod_equal_flops")


def runs(path: Path, jobs: list[dict], train: Callable[[dict], dict], log) -> list[dict]:
    """``{**job, **train(job), "seconds"}`` for every job. Jobs already recorded in ``path`` (JSON lines) are
    read back; the others run longest first in forked single-threaded workers, one per usable core, and are
    appended to ``path`` as they finish."""
    key = lambda r: tuple(r[k] for k in JOB)  # noqa: E731
    done = {key(r): r for r in map(json.loads, path.read_text().splitlines())} if path.is_file() else {}
    pending = sorted((j for j in jobs if key(j) not in done), key=lambda j: -j["length"])
    if pending:
        workers = min(len(pending), len(os.sched_getaffinity(0)))
        with mp.get_context("fork").Pool(workers, _start_worker, (train,)) as pool, path.open("a") as f:
            for record in pool.imap_unordered(_work, pending):
                f.write(json.dumps(record) + "\n")
                f.flush()
                done[key(record)] = record
                log(f"{path.stem} {record}")
    return [done[key(job)] for job in jobs]


_train: Callable[[dict], dict] | None = None  # set in each forked worker by _start_worker


def _start_worker(train: Callable[[dict], dict]) -> None:
    import torch

    global _train
    torch.set_num_threads(1)
    _train = train


def _work(job: dict) -> dict:
    t0 = time.perf_counter()
    record = {**job, **_train(job)}
    return {**record, "seconds": time.perf_counter() - t0}


def values(records: list[dict], metric: str, **where) -> list[float]:
    return [r[metric] for r in records if all(r[k] == v for k, v in where.items())]


def first_clear(records: list[dict], arm: str, base: str, metric: str, lower_is_better: bool) -> str:
    """The smallest length whose ``arm`` vs ``base`` verdict on ``metric`` is beyond 2 SE, with the verdict."""
    for n in sorted({r["length"] for r in records}):
        v = verdict(values(records, metric, arm=arm, length=n), values(records, metric, arm=base, length=n),
                    lower_is_better)
        if not v.startswith("no clear"):
            return f"**{n} steps**: {v}"
    return f"**none** of the swept lengths (up to {max(r['length'] for r in records)} steps)"


def moe(seeds: list[int], lengths: list[int], heldout_windows: int, work: Path, log) -> list[dict]:
    from bench import moe_specialisation as ms

    encode = ms.smollm2_compact_encoder()
    train_texts, heldout_texts = ms.load_texts(False, encode=encode), ms.load_texts(True, encode=encode)
    tokens, domains = ms.windows(heldout_texts, heldout_windows * len(ms.DOMAINS), ms.SEQ_LEN,
                                 np.random.default_rng(123))
    jobs = [{"arm": mode, "length": n, "seed": s, "heldout": len(tokens)}
            for n in lengths for s in seeds for mode in ("micro", "global")]
    return runs(work / "moe.jsonl", jobs, lambda j: ms.evaluate(
        ms.train(j["arm"], j["length"], train_texts, seed=j["seed"]), tokens, domains), log)


def mod(seeds: list[int], lengths: list[int], heldout_windows: int, work: Path, log) -> tuple[list[dict], dict]:
    """Records of every arm, length and seed, and the forward FLOPs/token of the dense and the MoD model."""
    import torch

    from bench import mod as bm
    from bench.moe_specialisation import load_texts, windows
    from tokensift.models.gpt import GPT
    from tokensift.models.gpt_config import GPTConfig, MoDConfig

    train_texts, heldout_texts = load_texts(False, bm.SEQ_LEN), load_texts(True, bm.SEQ_LEN)
    heldout, _ = windows(heldout_texts, heldout_windows, bm.SEQ_LEN, np.random.default_rng(123))
    config = {False: GPTConfig(**bm.MODEL), True: GPTConfig(**bm.MODEL, mod=MoDConfig())}
    flops = {routed: GPT(c).flops_per_token() for routed, c in config.items()}
    tokens_per_step = bm.BATCH * bm.SEQ_LEN

    def train(job: dict) -> dict:
        routed = job["arm"] != "dense"
        steps = round(job["length"] * flops[False] / flops[True]) if job["arm"] == "mod_equal_flops" else job["length"]
        torch.manual_seed(job["seed"])
        model = GPT(config[routed])
        bm._train(model, steps, train_texts)
        bits = bm._bits_per_byte(model, heldout)
        share = [v for k, v in model.stats().items() if k.endswith("routed_share")]
        return {"steps": steps, "train_flops": 3 * flops[routed] * steps * tokens_per_step, "bits_per_byte": bits,
                "routed_share": float(np.mean(share)) if share else 1.0}

    jobs = [{"arm": arm, "length": n, "seed": s, "heldout": len(heldout)} for n in lengths for s in seeds for arm in MOD_ARMS]
    return runs(work / "mod.jsonl", jobs, train, log), {"dense": flops[False], "mod": flops[True]}


def run(quick: bool, work: Path, log) -> dict:
    cfg = QUICK if quick else FULL
    seeds = list(range(cfg["seeds"]))
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"config": cfg, "seconds": {}}
    t0 = time.perf_counter()
    out["moe"] = moe(seeds, cfg["moe_lengths"], cfg["moe_heldout"], work, log)
    out["seconds"]["moe"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["mod"], out["mod_flops_per_token"] = mod(seeds, cfg["mod_lengths"], cfg["mod_heldout"], work, log)
    out["seconds"]["mod"] = time.perf_counter() - t0
    return out


def moe_lines(records: list[dict], seconds: float) -> list[str]:
    from bench.moe_specialisation import DOMAINS, SEQ_LEN

    seeds = sorted({r["seed"] for r in records})
    lengths = sorted({r["length"] for r in records})
    rows = []
    for n in lengths:
        for key, (label, lower) in MOE_METRICS.items():
            micro, glob = (values(records, key, arm=a, length=n) for a in ("micro", "global"))
            rows.append([str(n), f"{n * 16 * SEQ_LEN:,}", label, fmt(micro, 4), fmt(glob, 4), verdict(glob, micro, lower)])
        rows.append([str(n), f"{n * 16 * SEQ_LEN:,}", "wall s per run",
                     *(fmt(values(records, "seconds", arm=a, length=n), 1) for a in ("micro", "global")), "—"])
    return [
        f"**MoE.** `bench.moe_specialisation`: the sample corpus' {len(DOMAINS)} domains ({', '.join(DOMAINS)}; real "
        "text) in SmolLM2's BPE, ids remapped to the 4,095 most frequent plus one shared id. A GPT of 2 blocks, "
        "n_embd 64, every MLP a dropless MoE of 8 experts top-2, LBL coefficient 0.1, AdamW 3e-3 constant. Each "
        f"micro-batch is one {SEQ_LEN}-token window of one document (one domain); 16 micro-batches of uniformly "
        f"drawn domains make an optimizer step ({16 * SEQ_LEN:,} tokens). Swept lengths {lengths} steps; seeds "
        f"{seeds} (the seed sets the initialisation and the data order; micro and global share both). Evaluation: "
        f"{records[0]['heldout']} windows of heldout documents (fixed draw, eval mode); NMI between a token's "
        "domain and each of its top-2 experts and max/mean expert load are averaged over the 2 MoE layers. "
        f"Mean ± sample std over seeds; verdict = global minus micro against 2 SE. Part wall time {seconds / 60:.1f} min.",
        "", *table(["steps", "tokens trained", "metric", "micro-batch LBL", "global-batch LBL", "global vs micro"], rows),
        "", *(f"- Smallest swept length with {label} global vs micro beyond 2 SE: "
              f"{first_clear(records, 'global', 'micro', key, lower)}." for key, (label, lower) in MOE_METRICS.items()),
    ]


def mod_lines(records: list[dict], flops: dict, seconds: float) -> list[str]:
    from bench.mod import SEQ_LEN

    seeds = sorted({r["seed"] for r in records})
    lengths = sorted({r["length"] for r in records})
    rows = []
    for n in lengths:
        dense = values(records, "bits_per_byte", arm="dense", length=n)
        for arm in MOD_ARMS:
            first = next(r for r in records if r["arm"] == arm and r["length"] == n)
            bits = values(records, "bits_per_byte", arm=arm, length=n)
            rows.append([str(n), arm, str(first["steps"]), f"{first['train_flops']:.3g}", fmt(bits, 4),
                         "—" if arm == "dense" else verdict(bits, dense),
                         fmt(values(records, "routed_share", arm=arm, length=n), 3),
                         fmt(values(records, "seconds", arm=arm, length=n), 1)])
    return [
        f"**MoD.** `bench.mod`: the sample corpus as UTF-8 bytes, windows of {SEQ_LEN} bytes, batch 8. Dense: the "
        "built-in GPT, 8 blocks, n_embd 96, 4 heads, AdamW 1e-3; MoD: the same with blocks 2, 4, 6, 8 routed at "
        "capacity 0.125 and the stop-gradient predictor for causal routing. Forward FLOPs/token (`GPT.flops_per_token`): "
        f"dense {flops['dense']:,.0f}, MoD {flops['mod']:,.0f} (ratio {flops['mod'] / flops['dense']:.3f}); "
        "training FLOPs = 3 x forward x tokens. Swept dense lengths "
        f"{lengths} steps; per length the MoD model trains the same steps and, at equal training FLOPs, "
        f"round(steps x {flops['dense'] / flops['mod']:.3f}) steps. Seeds {seeds} set the initialisation (bench.mod's "
        f"loop draws the same data order for every run). Heldout: {records[0]['heldout']} windows (fixed draw), bits "
        "per byte with causal routing (the predictor decides per token from its prefix); routed share = share of "
        "tokens the causal routing sends through a routed block on the last heldout batch (1 for dense). Mean ± "
        f"sample std over seeds; verdict = arm minus dense against 2 SE. Part wall time {seconds / 60:.1f} min.",
        "", *table(["dense steps", "arm", "steps", "training FLOPs", "heldout bits/byte", "vs dense",
                    "routed share (causal)", "wall s"], rows),
        "", *(f"- Smallest swept length with {arm} vs dense bits/byte beyond 2 SE: "
              f"{first_clear(records, arm, 'dense', 'bits_per_byte', True)}." for arm in MOD_ARMS[1:]),
    ]


def section(data: dict) -> list[str]:
    return [*moe_lines(data["moe"], data["seconds"]["moe"]), "",
            *mod_lines(data["mod"], data["mod_flops_per_token"], data["seconds"]["mod"])]
