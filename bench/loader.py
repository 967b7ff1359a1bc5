"""TokenLoader throughput (packing + label weights) against what a CPU training step consumes.

Data: the sample corpus (news, code, math, instruction text) as UTF-8 byte tokens with a ``token_weights``
column, written as a 4-shard snapshot. Ours: label tokens per second the loader yields (seq_len 256,
batch 8, shuffled). Anchor: label tokens per second one process trains on with the built-in GPT of
``examples/train_gpt.yaml`` (4 layers, 128 wide, fp32) through the trainer's own micro-batch loss and torch
AdamW. A ratio above 1 means the loader is not what limits training.

Reads per rank: at world size 8 (batch 1, so 8 lanes), the tokens in the row groups each rank reads over one
epoch, over its share (epoch tokens / 8); shards in row groups of 1/32 of a shard (at least 128). Anchor: the
loader before row-group sharding, where every rank read every shard (8x its share).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow.compute as pc
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
        pq.write_table(table, out / "data" / f"train-{i:05d}-of-00004.parquet", row_group_size=max(1, table.num_rows // 32))
    write_manifest(out)
    return out


def loader_tokens_per_s(snapshot: Path, seq_len: int, batch_size: int, batches: int) -> float:
    from tokensift.pipeline.loader import TokenLoader

    t0 = time.perf_counter()
    n = sum(b["labels"].numel() for _, b in zip(range(batches), TokenLoader(snapshot, seq_len, batch_size), strict=False))
    return n / (time.perf_counter() - t0)


def rank_read_ratio(snapshot: Path, world: int, seq_len: int) -> float:
    """Largest over ``world`` ranks of (tokens in the row groups the rank read in one epoch) / (its share)."""
    from tokensift.pipeline.loader import TokenLoader

    read, original = [], pq.ParquetFile.read_row_group

    def counting(self, i, *args, **kwargs):
        table = original(self, i, *args, **kwargs)
        read.append(int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0))
        return table

    ratios = []
    with mock.patch.object(pq.ParquetFile, "read_row_group", counting):
        for rank in range(world):
            loader = TokenLoader(snapshot, seq_len, 1, rank=rank, world_size=world, epochs=1)
            read.clear()
            sum(1 for _ in loader)
            ratios.append(sum(read) / (loader.source.tokens_per_epoch / world))
    return max(ratios)


def trainer_tokens_per_s(snapshot: Path, seq_len: int, batch_size: int, steps: int) -> float:
    from tokensift.models.gpt import GPT
    from tokensift.models.gpt_config import GPTConfig
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
        metadata = [pq.read_metadata(f) for f in (snapshot / "data").glob("*.parquet")]
        tokens, groups = sum(m.num_rows for m in metadata), sum(m.num_row_groups for m in metadata)
        ours = loader_tokens_per_s(snapshot, seq_len, batch_size, 30 if quick else 400)
        anchor = trainer_tokens_per_s(snapshot, seq_len, batch_size, 2 if quick else 10)
        reads = rank_read_ratio(snapshot, 8, seq_len)
    return [{
        "measure": f"loader tokens/s with weights (seq 256 x batch 8, {tokens} docs) vs CPU trainer step",
        "ours": round(ours),
        "anchor": round(anchor),
        "unit": "tokens/s",
        "ratio": round(ours / anchor, 1),
        "note": "ratio = ours / anchor; anchor = label tokens/s one process trains on (GPT 4x128, fp32, "
                "weighted loss + AdamW, torch threads as set)",
    }, {
        "measure": f"tokens read per rank at world size 8 over its share (one epoch, {tokens} docs, {groups} row groups)",
        "ours": round(reads, 2),
        "anchor": 8.0,
        "unit": "x share",
        "ratio": round(reads / 8.0, 2),
        "note": "ours: the most any rank read; anchor: every rank reading every shard (the loader before); "
                "goal <= 1.25",
    }]


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
