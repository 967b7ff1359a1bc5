"""ICon cost per candidate on the shipped SmolLM2 at the paper's context length: prefix KV reuse vs the
reference's one forward pass per (candidate, assessment sample) pair.

Assessment samples: real GSM8K rows of the sample corpus (prompt formatted with the Alpaca template,
response). Candidates: the longest news documents of the sample corpus, each longer than 2,040 tokens, so
that the context ``[bos] T[:2040 tokens] "\\n\\n\\n"`` has the paper's length; the random control (same
character length, seeded per candidate) is cut to 2,040 tokens too.

- ours: ``IConScorer`` (KV reuse, the scoring engine's default token budget): each context (candidate,
  random control) runs once, its LM head at the last position only, and the n assessment samples are
  scored behind its KV cache in token-budget batches.
- anchor: the RICo reference's formulation, written out here with plain HF calls: for every context and
  assessment sample one forward pass over ``context + x + y`` (logits at every position, cross-entropy),
  PPL from the losses of y; the same control strings as ours. 2 n passes per candidate.

Both sides must give the same PPL(S | T) and PPL_rand(S | T~): the bench fails when they differ by more
than 1e-3 (relative); the largest difference is in the note. Rows: forward passes, token positions run
through the model and wall seconds per candidate; lower is better, ``ratio`` = anchor / ours.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from bench.lm_scoring import raw_losses

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 2040  # the reference's candidate truncation


def _data(tok, n_assess: int, n_cand: int):
    from tokensift.selectors.icon_scorer import TEMPLATE

    sample = ROOT / "sample_data"
    math_rows = pq.read_table(sample / "math.parquet", columns=["prompt", "response"]).slice(0, n_assess).to_pylist()
    assessment = [(TEMPLATE.format(prompt=r["prompt"]), r["response"]) for r in math_rows]
    news = pq.read_table(sample / "news.parquet", columns=["id", "text"]).to_pylist()
    long = sorted(news, key=lambda r: -len(r["text"]))[:n_cand]
    short = [r["id"] for r in long if len(tok(r["text"], add_special_tokens=False)["input_ids"]) <= CONTEXT]
    assert not short, f"candidates shorter than {CONTEXT} tokens: {short}"
    return assessment, long


def _reference(scorer, text: str, key: str) -> tuple[dict, dict]:
    """PPL(S | T) and PPL_rand(S | T~) with one plain forward pass per pair, and what it ran."""
    from tokensift.selectors.icon_scorer import random_control

    control = random_control(len(text), f"{scorer.seed}:{key}")  # ours' per-candidate control string
    ppl, cost = {}, {"forward_passes": 0, "tokens_computed": 0}
    for name, context in (("ppl_with_context", text), ("ppl_with_random", control)):
        prefix = scorer.context_prefix(context)
        values = []
        for inputs, n_y in zip(scorer.inputs, scorer.n_response, strict=True):
            ids = prefix + inputs
            losses = raw_losses(scorer.model, [ids], batch_size=1)[0]
            values.append(math.exp(float(np.mean(losses[-n_y:], dtype=np.float64))))
            cost["forward_passes"] += 1
            cost["tokens_computed"] += len(ids)
        ppl[name] = np.asarray(values)
    return ppl, cost


def run(quick: bool = False) -> list[dict]:
    import torch

    from tokensift.models.assets import smollm2
    from tokensift.selectors.icon_scorer import IConScorer

    n_assess, n_cand = (16, 1) if quick else (16, 2)
    model, tok = smollm2()
    assessment, candidates = _data(tok, n_assess, n_cand)
    scorer = IConScorer(model, tok, assessment, max_context_tokens=CONTEXT)
    ours = {"forward_passes": 0.0, "tokens_computed": 0.0, "seconds": 0.0}
    anchor = dict(ours)
    diff = 0.0
    for c in candidates:  # ours and anchor interleaved, candidate by candidate
        start = time.perf_counter()
        got = scorer.perplexities(c["text"], c["id"])
        ours["seconds"] += time.perf_counter() - start
        start = time.perf_counter()
        ref, cost = _reference(scorer, c["text"], c["id"])
        anchor["seconds"] += time.perf_counter() - start
        for key in ("forward_passes", "tokens_computed"):
            ours[key] += got[key]
            anchor[key] += cost[key]
        for key in ("ppl_with_context", "ppl_with_random"):
            diff = max(diff, float(np.max(np.abs(got[key] / ref[key] - 1))))
    assert diff < 1e-3, f"ICon perplexities differ from the reference formulation by {diff:.1e} (relative)"
    setup = (f"{n_cand} news candidates cut to {CONTEXT} tokens x {n_assess} GSM8K assessment samples, "
             f"SmolLM2-135M fp32, {torch.get_num_threads()} threads")
    units = {"forward_passes": "passes/candidate", "tokens_computed": "tokens/candidate", "seconds": "s/candidate"}
    return [
        {
            "measure": f"icon {key.replace('_', ' ')} per candidate",
            "ours": ours[key] / n_cand,
            "anchor": anchor[key] / n_cand,
            "unit": unit,
            "ratio": anchor[key] / ours[key],
            "note": f"lower is better, ratio = anchor/ours; ours = KV reuse + token-budget batches, anchor = reference "
            f"one pass per pair (plain HF forward + cross-entropy); {setup}; same PPLs: max relative difference {diff:.1e}",
        }
        for key, unit in units.items()
    ]


if __name__ == "__main__":
    import sys

    for row in run(quick="--quick" in sys.argv):
        print(row)
