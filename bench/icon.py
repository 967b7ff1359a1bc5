"""ICon cost per candidate on the shipped SmolLM2: prefix KV reuse vs the reference's one pass per pair.

Candidates and assessment samples are real GSM8K rows of the sample corpus (prompt / response), formatted
with the Alpaca template. Both sides compute the same three perplexity tables (checked: the largest
relative difference in PPL(S | T) is reported in the note).

- ours: ``IConScorer(kv_reuse=True, batch_size=8)``: each context (candidate, random control) runs once
  and the n assessment samples are scored behind its KV cache, 8 per forward pass.
- anchor: the RICo reference's schedule, ``IConScorer(kv_reuse=False, batch_size=1)``: one forward pass
  of context + sample per (candidate, assessment sample) pair and context, 2 n passes per candidate.

Rows: forward passes, token positions computed, and wall seconds per candidate; for all three lower is
better and ``ratio`` = anchor / ours.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def _rows(n: int) -> list[dict]:
    from tokensift.data.sample import build_sample

    sample = ROOT / "sample_data"
    if not (sample / "manifest.json").is_file():
        build_sample(sample)
    rows = pq.read_table(sample / "math.parquet", columns=["id", "text", "prompt", "response"]).slice(0, 4 * n).to_pylist()
    return sorted(rows, key=lambda r: len(r["text"]))[:n]


def _measure(scorer, candidates) -> tuple[dict, np.ndarray]:
    from tokensift.selectors.icon import score_candidate
    from tokensift.selectors.icon_scorer import candidate_text

    total = {"forward_passes": 0, "tokens_computed": 0, "seconds": 0.0}
    ppl = []
    for c in candidates:
        start = time.perf_counter()
        stats = score_candidate(scorer, candidate_text(c["prompt"], c["response"], c["text"]), c["id"])
        total["seconds"] += time.perf_counter() - start
        total["forward_passes"] += stats["forward_passes"]
        total["tokens_computed"] += stats["tokens_computed"]
        ppl.append(stats["ppl_with_context"])
    return {k: v / len(candidates) for k, v in total.items()}, np.concatenate(ppl)


def run(quick: bool = False) -> list[dict]:
    from tokensift.models.assets import smollm2
    from tokensift.selectors.icon_scorer import TEMPLATE, IConScorer

    n_assess, n_cand = (4, 2) if quick else (16, 4)
    rows = _rows(n_assess + n_cand)
    assessment = [(TEMPLATE.format(prompt=r["prompt"]), r["response"]) for r in rows[:n_assess]]
    candidates = rows[n_assess:]
    model, tok = smollm2()
    ours, ppl_ours = _measure(IConScorer(model, tok, assessment, batch_size=8, kv_reuse=True), candidates)
    anchor, ppl_ref = _measure(IConScorer(model, tok, assessment, batch_size=1, kv_reuse=False), candidates)
    diff = float(np.max(np.abs(ppl_ours / ppl_ref - 1)))
    setup = f"{n_cand} GSM8K candidates x {n_assess} assessment samples, SmolLM2-135M fp32 CPU"
    units = {"forward_passes": "passes/candidate", "tokens_computed": "tokens/candidate", "seconds": "s/candidate"}
    return [
        {
            "measure": f"icon {key.replace('_', ' ')} per candidate",
            "ours": float(ours[key]),
            "anchor": float(anchor[key]),
            "unit": unit,
            "ratio": float(anchor[key] / ours[key]),
            "note": f"lower is better, ratio = anchor/ours; ours = KV reuse + batch 8, anchor = reference one pass "
            f"per pair; {setup}; max relative PPL(S|T) difference {diff:.1e}",
        }
        for key, unit in units.items()
    ]


if __name__ == "__main__":
    for row in run(quick=True):
        print(row)
