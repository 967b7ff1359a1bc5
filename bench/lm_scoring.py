"""LM scoring tokens/s (per-token losses, SmolLM2-135M, fp32, CPU): tokensift vs a raw HF forward, same cores.

Documents: the first n news documents of the sample corpus, each cut to its first 255 tokens and decoded
back to text, so that every path scores the same ids: the tokenizer's BOS + the document's tokens (what
``lm_nll`` scores); throughput counts predicted tokens (targets).

- anchor: a raw HF forward + cross-entropy in the bench process, torch threads = the machine's cores,
  ``torch.inference_mode``, batches of 8 documents in corpus order, right-padded with an attention mask,
  ``F.cross_entropy`` over the full logits, padded positions dropped afterwards; ids prepared off the
  clock. Measured before and after ours and averaged, so that the shared machine's drift weighs on both.
- ours, ``token_losses``: ``tokensift.models.scoring.token_losses(model, ids)`` in the same process.
- ours, ``tokensift run``: the CLI in a fresh process (embedded Ray on all cores) with one ``lm_nll`` stage,
  one actor of ``cores - 0.5`` CPUs (the read task takes the other 0.5; torch threads = CPUs rounded up),
  over the documents in 8 Parquet shards. Steady rate = (targets(n2) - targets(n1)) / (wall(n2) -
  wall(n1)): Ray start-up, model load and publishing the snapshot cancel out. The run's ``<name>_nll``
  column is checked against the anchor's summed losses (relative 1e-4).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
CUT = 255  # document tokens kept (the BOS makes 256 positions)
SHARDS = 8


def raw_losses(model, rows: list[list[int]], batch_size: int = 8) -> list[np.ndarray]:
    """The anchor: per-token NLL from a plain HF forward + ``F.cross_entropy`` over the full logits."""
    import torch
    import torch.nn.functional as F

    out = []
    with torch.inference_mode():
        for lo in range(0, len(rows), batch_size):
            batch = rows[lo : lo + batch_size]
            width = max(len(r) for r in batch)
            ids = torch.tensor([r + [0] * (width - len(r)) for r in batch])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch])
            logits = model(input_ids=ids, attention_mask=mask).logits
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(len(batch), -1)
            out += [nll[r, : len(row) - 1].numpy() for r, row in enumerate(batch)]
    return out


def documents(tok, n: int) -> tuple[list[str], list[list[int]]]:
    """The first ``n`` news texts cut to ``CUT`` tokens, and the ids ``lm_nll`` scores for each (BOS first)."""
    texts = pq.read_table(ROOT / "sample_data" / "news.parquet", columns=["text"]).column("text").to_pylist()[:n]
    cut = [tok.decode(tok(t, add_special_tokens=False)["input_ids"][:CUT]) for t in texts]
    return cut, [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in cut]


def _tokens_per_s(fn, ids: list[list[int]]) -> tuple[float, list[np.ndarray]]:
    start = time.perf_counter()
    losses = fn(ids)
    return sum(len(r) - 1 for r in ids) / (time.perf_counter() - start), losses


def run_cli(texts: list[str], tmp: Path, name: str, cores: int) -> tuple[float, np.ndarray]:
    """Wall seconds of ``tokensift run`` with one ``lm_nll`` stage over ``texts``, and its NLL column."""
    src = tmp / f"{name}-in"
    src.mkdir()
    per = -(-len(texts) // SHARDS)
    for s, lo in enumerate(range(0, len(texts), per)):
        chunk = texts[lo : lo + per]
        ids = [f"d{i:05d}" for i in range(lo, lo + len(chunk))]
        pq.write_table(pa.table({"id": ids, "text": chunk}), src / f"part-{s:02d}.parquet")
    cfg = {
        "source": {"paths": [str(src)], "read_num_cpus": 0.5},
        "output": {"path": str(tmp / f"{name}-out"), "report": False},
        "ray": {"num_cpus": cores},
        "stages": [{
            "stage": "lm_nll", "name": "lm", "model": "smollm2",
            "resources": {"num_cpus": cores - 0.5, "concurrency": 1, "batch_size": 32},
        }],
    }
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tokensift.cli", "run", str(tmp / f"{name}.yaml")], cwd=ROOT, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    table = pa.concat_tables([pq.read_table(p) for p in sorted((tmp / f"{name}-out" / "data").glob("*.parquet"))])
    return seconds, table.sort_by("id").column("lm_nll").to_numpy()


def run(quick: bool = False) -> list[dict]:
    import torch

    from tokensift.models.assets import smollm2
    from tokensift.models.scoring import token_losses

    cores = os.cpu_count()
    torch.set_num_threads(cores)
    model, tok = smollm2()
    n1, n2 = (16, 64) if quick else (40, 200)
    texts, ids = documents(tok, n2)
    raw = lambda rows: raw_losses(model, rows)  # noqa: E731
    ours = lambda rows: token_losses(model, rows)  # noqa: E731
    raw_losses(model, ids[:8])  # warm-up
    anchor, engine = [], []
    for _ in range(2):
        rate, reference = _tokens_per_s(raw, ids)
        anchor.append(rate)
        rate, got = _tokens_per_s(ours, ids)
        engine.append(rate)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(reference, got, strict=True))
        assert diff < 1e-3, f"token_losses differs from the raw forward by {diff}"
        if len(anchor) == 1:
            with tempfile.TemporaryDirectory(prefix="bench-lm-") as tmp:
                small, _ = run_cli(texts[:n1], Path(tmp), "small", cores)
                large, nll = run_cli(texts, Path(tmp), "large", cores)
    totals = np.array([r.sum(dtype=np.float64) for r in reference])
    np.testing.assert_allclose(nll, totals, rtol=1e-4)  # the run scored the very same tokens
    steady = sum(len(r) - 1 for r in ids[n1:]) / (large - small)
    raw_rate = float(np.mean(anchor))
    setup = (f"{n2} news docs x {CUT + 1} tokens ({sum(len(r) - 1 for r in ids):,} targets), SmolLM2-135M fp32, "
             f"{cores} cores; anchor = raw HF forward + cross-entropy, batch 8, {cores} threads, measured "
             f"{', '.join(f'{a:.0f}' for a in anchor)} tok/s")
    return [
        {
            "measure": "LM scoring through tokensift run (one lm_nll stage), steady tokens/s",
            "ours": steady,
            "anchor": raw_rate,
            "unit": "tokens/s",
            "ratio": steady / raw_rate,
            "note": f"higher is better; ours = (targets({n2}) - targets({n1} docs)) / (wall({n2}) - wall({n1})) "
            f"of `tokensift run` ({small:.0f} s / {large:.0f} s), 1 actor x {cores - 0.5} CPUs; {setup}",
        },
        {
            "measure": "token_losses alone, tokens/s",
            "ours": float(np.mean(engine)),
            "anchor": raw_rate,
            "unit": "tokens/s",
            "ratio": float(np.mean(engine)) / raw_rate,
            "note": f"higher is better; same process and ids, measured {', '.join(f'{e:.0f}' for e in engine)} tok/s; {setup}",
        },
    ]


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
