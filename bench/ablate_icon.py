"""Part 4 of ``python -m bench.ablate``: ICon in its setting (Yang et al., "In-Context Contribution for
Automatic Data Selection", released as RICo): instruction tuning of a pretrained LM, scored by that LM.

1. Target LM: a byte-level Llama (``bench.ablate_bytelm``) pretrained here on the corpus' general mix.
2. Candidates: the train split's instruction-response pairs (ShareGPT and GSM8K), prompt masked in training.
3. ICon through the pipeline (``examples/ablate/icon.yaml``): ``icon_score`` of a seeded subset of the
   candidates against the assessment samples (the steering halves of heldout instruction and math), with
   the random-context control; ``icon`` labels the top 15 % by Significance and trains the paper's
   classifier (LoRA on the same LM), measured on the last 10 % of the scored rows; ``icon_classify`` then
   scores every candidate.
4. Equal budget: the classifier's top candidates up to 15 % of the candidates' tokens vs random draws of
   the same budget; each fine-tunes the pretrained LM for ``sft_steps`` steps on response tokens, per seed;
   held-out response loss (nats per byte) on the evaluation halves of heldout instruction and math.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench import ablate_report as r

TITLE = "4. ICon scoring instruction data with the model it tunes"
DOMAINS = ("instruction", "math")
SEEDS = 3
LM = {"layers": 2, "width": 128, "heads": 4, "seq_len": 512}
FULL = {"candidates": 330, "samples": 16, "pretrain_steps": 200, "sft_steps": 60, "eval_batches": 20}
QUICK = {"candidates": 24, "samples": 4, "pretrain_steps": 10, "sft_steps": 5, "eval_batches": 3}


def run(quick: bool, work: Path, log=print) -> dict:
    from bench.ablate_bytelm import pretrain
    from bench.ablate_select import Pool, ranked_by_score, read_split, run_config, target_split

    size, work = QUICK if quick else FULL, Path(work)
    t0 = time.time()
    general = Pool(work / "general", read_split(False))
    lm, pre = pretrain(general.path, work / "lm", LM["layers"], LM["width"], LM["heads"], LM["seq_len"],
                       size["pretrain_steps"])
    log(f"icon: byte LM pretrained ({size['pretrain_steps']} steps) in {time.time() - t0:.0f} s")
    rows = read_split(False, DOMAINS)
    rows = rows.filter(pc.invert(pc.is_null(rows.column("response"))))
    pool = Pool(work, rows, overrides=("stages.0.prompt_column=prompt", "stages.0.response_column=response"))
    halves = [target_split(read_split(True, [d])) for d in DOMAINS]
    pq.write_table(pa.concat_tables([h[0] for h in halves]), work / "assessment.parquet")
    t0 = time.time()
    common = [f"source.paths=[{pool.path / 'data'}/*.parquet]"]
    scored = run_config("icon", [*common, f"output.path={work / 'select' / 'icon'}", f"stages.0.model={lm}",
                                 f"stages.0.assessment.paths=[{work / 'assessment.parquet'}]",
                                 f"stages.0.assessment.max_samples={size['samples']}",
                                 f"stages.0.subset_fraction={min(1.0, size['candidates'] / len(pool.ids))}",
                                 f"stages.1.lm_classifier.model={lm}", f"stages.1.classifier_path={work / 'classifier'}"],
                        refresh=True)
    icon_seconds = time.time() - t0
    ranked = run_config("icon_classify", [*common, f"output.path={work / 'select' / 'icon_classify'}",
                                          f"stages.0.classifier={work / 'classifier'}"], refresh=True)
    order = ranked_by_score(ranked, "icon_classify_score")
    log(f"icon: scored and classified in {time.time() - t0:.0f} s")
    evals = _eval_snapshots(work, [h[1] for h in halves])
    arms = {}
    for arm in ("random", "icon"):
        arms[arm] = [_sft(pool, lm, arm, order, seed, size, evals, work) for seed in range(SEEDS)]
        log(f"icon: arm {arm} fine-tuned ({SEEDS} seeds)")
    return {"size": size, "lm": {**LM, "pretrain_seconds": pre["seconds"], "pretrain_loss": pre["train_loss"]},
            "candidates": len(pool.ids), "budget": pool.budget, "icon": _icon_stats(scored), "icon_seconds": icon_seconds,
            "seeds": SEEDS, "arms": arms}


def _eval_snapshots(work: Path, tables: list[pa.Table]) -> dict[str, Path]:
    from bench.ablate_train import write_eval_snapshot
    from tokensift.pipeline.tokenize import TokenizeParams

    params = TokenizeParams(tokenizer="byte", prompt_column="prompt", response_column="response", max_length=LM["seq_len"])
    return {d: write_eval_snapshot(t, work / "eval" / d, params, mask_prompt=True) for d, t in zip(DOMAINS, tables, strict=True)}


def _sft(pool, lm: Path, arm: str, order: list[str], seed: int, size: dict, evals: dict, work: Path) -> dict:
    from bench.ablate_train import arm_bits

    snap = work / "snap" / f"{arm}-s{seed}"
    stats = pool.snapshot(pool.random(seed) if arm == "random" else order, snap)
    run = arm_bits(snap, work / "sft" / f"{arm}-s{seed}", seed, [
        "model.kind=hf", f"model.path={lm}", f"data.seq_len={LM['seq_len']}", "data.micro_batch_size=8",
        "data.mask_prompt=true", f"max_steps={size['sft_steps']}", "optim.lr=5e-4", "optim.warmup_steps=5"],
        evals, size["eval_batches"], seq_len=LM["seq_len"], batch_size=8)
    return {"bits": run["bits"], "snapshot": stats, "seconds": run["seconds"]}


def _icon_stats(snapshot: Path) -> dict:
    """The ``icon`` stage's report in the snapshot's manifest, and the Significance spread of the scored rows."""
    manifest = json.loads((snapshot / "manifest.json").read_text())
    report = next(s["stats"] for s in manifest["stages"] if s["name"] == "icon")
    t = pq.read_table(snapshot / "data", columns=["icon_significance"]).column(0).to_numpy(zero_copy_only=False)
    sig = t[~np.isnan(t)]
    return {**{k: report.get(k) for k in ("scored", "positives", "significance_threshold", "train_rows", "test_rows",
                                          "test_accuracy", "test_auc")},
            "significance_mean": float(sig.mean()) if len(sig) else None,
            "significance_std": float(sig.std(ddof=1)) if len(sig) > 1 else None}


def section(data: dict) -> list[str]:
    size, lm, ic = data["size"], data["lm"], data["icon"]
    f = {k: "—" if v is None else f"{v:.3f}" for k, v in ic.items() if k not in ("scored", "positives", "test_rows")}
    lines = [
        f"Target LM: a byte-level Llama ({lm['layers']} layers x {lm['width']}, context {lm['seq_len']}) pretrained "
        f"here for {size['pretrain_steps']} steps of 8 x {lm['seq_len']} bytes on the corpus' general mix (last "
        f"training loss {lm['pretrain_loss']:.3f} nats/byte). Candidates: {data['candidates']:,} instruction-response "
        f"pairs (ShareGPT, GSM8K). ICon scored {ic['scored']} of them against {size['samples']} assessment samples "
        f"(steering halves of heldout {' and '.join(DOMAINS)}), with the random-context control, in "
        f"{data['icon_seconds'] / 60:.1f} min; Significance {f['significance_mean']} ± {f['significance_std']}; "
        f"{ic['positives']} positives (top 15 %). The LoRA classifier on the same LM, on the last {ic['test_rows']} "
        f"scored rows: accuracy {f['test_accuracy']}, AUC {f['test_auc']}.", "",
        f"Equal token budget: {data['budget']:,} byte tokens (15 % of the candidates) per snapshot; the pretrained "
        f"LM fine-tuned {size['sft_steps']} steps (8 x {lm['seq_len']} bytes, response tokens only) per seed, "
        f"{data['seeds']} seeds; held-out response loss in bits per byte on the evaluation halves, mean ± std.", "",
    ]
    keys = [*DOMAINS, "mean"]
    header = ["arm", "% tokens " + " / ".join(DOMAINS), *[f"{k} bits/byte" for k in keys], *[f"{k} vs random" for k in keys]]
    return lines + r.table(header, r.budget_rows(data["arms"], DOMAINS, keys))
