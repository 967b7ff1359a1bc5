"""TokenLoader throughput (packing + label weights) against what a CPU training step consumes.

Data: the sample corpus (news, code, math, instruction text) as UTF-8 byte tokens with a ``token_weights``
column, written as a 4-shard snapshot. Ours: label tokens per second the loader yields (seq_len 256,
batch 8, shuffled). Anchor: label tokens per second one process trains on with the built-in GPT of
``examples/train_gpt.yaml`` (4 layers, 128 wide, fp32) through the trainer's own micro-batch loss and torch
AdamW. A ratio above 1 means the loader is not what limits training.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]


def byte_snapshot(out: Path, docs_per_domain: int | None) -> Path:
    """The sample corpus as byte tokens plus random token weights, 4 shards (one per domain), and its manifest."""
    from tokensift.data.sample import build_sample
    from tokensift.pipeline.schema import TOKEN_WEIGHTS_TYPE, ragged_column
    from tokensift.pipeline.shards import write_manifest
    from tokensift.pipeline.tokenize import Tokenize, TokenizeParams

    sample = ROOT / "sample_data"
    if not (sample / "manifest.json").is_file():
        build_sample(sample)
    tok, rng = Tokenize(TokenizeParams(tokenizer="byte")), np.random.default_rng(0)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(sample.glob("*.parquet"))):
        table = pq.read_table(f, columns=["id", "text"])
        table = tok(table.slice(0, docs_per_domain) if docs_per_domain else table)
        weights = [rng.random(n).astype(np.float32) for n in table.column("n_tokens").to_numpy()]
        table = table.append_column("token_weights", ragged_column(weights, TOKEN_WEIGHTS_TYPE))
        pq.write_table(table, out / "data" / f"train-{i:05d}-of-00004.parquet")
    write_manifest(out)
    return out


def loader_tokens_per_s(snapshot: Path, seq_len: int, batch_size: int, batches: int) -> float:
    from tokensift.pipeline.loader import TokenLoader

    t0 = time.perf_counter()
    n = sum(b["labels"].numel() for _, b in zip(range(batches), TokenLoader(snapshot, seq_len, batch_size), strict=False))
    return n / (time.perf_counter() - t0)


def trainer_tokens_per_s(snapshot: Path, seq_len: int, batch_size: int, steps: int) -> float:
    from tokensift.models.gpt import GPT, GPTConfig
    from tokensift.pipeline.loader import TokenLoader
    from tokensift.trainers.step import micro_batch_loss

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, block_size=seq_len, n_layer=4, n_head=4, n_embd=128)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [b for _, b in zip(range(steps + 1), TokenLoader(snapshot, seq_len, batch_size), strict=False)]
    micro_batch_loss(model, model, batches[0])[0].backward()  # warm-up
    t0 = time.perf_counter()
    for b in batches[1:]:
        micro_batch_loss(model, model, b)[0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch_size * seq_len / (time.perf_counter() - t0)


def run(quick: bool = False) -> list[dict]:
    seq_len, batch_size = 256, 8
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = byte_snapshot(Path(tmp), 50 if quick else None)
        tokens = sum(pq.read_metadata(f).num_rows for f in (snapshot / "data").glob("*.parquet"))
        ours = loader_tokens_per_s(snapshot, seq_len, batch_size, 30 if quick else 400)
        anchor = trainer_tokens_per_s(snapshot, seq_len, batch_size, 2 if quick else 10)
    return [{
        "measure": f"loader tokens/s with weights (seq 256 x batch 8, {tokens} docs) vs CPU trainer step",
        "ours": round(ours),
        "anchor": round(anchor),
        "unit": "tokens/s",
        "ratio": round(ours / anchor, 1),
        "note": "ratio = ours / anchor; anchor = label tokens/s one process trains on (GPT 4x128, fp32, "
                "weighted loss + AdamW, torch threads as set)",
    }]


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
