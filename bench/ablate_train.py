"""Train one arm with the DeepSpeed trainer (``tokensift.trainers.train``) and measure held-out loss.

Every arm trains ``examples/ablate/train.yaml`` (the same GPT, steps, batch and schedule) on its snapshot;
only the snapshot, the seed and (token level) the online scorer differ. Held-out loss is the weighted mean
cross-entropy ``sum(w * ce) / sum(w)`` over the evaluation snapshot's packed sequences
(:class:`~tokensift.pipeline.loader.TokenLoader`, no shuffle, document boundaries masked), in nats per
token; :func:`bits` turns it into bits per token (= bits per byte for the byte tokenizer, up to the EOS).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tokensift.config import load
from tokensift.pipeline import schema
from tokensift.pipeline.loader import TokenLoader
from tokensift.trainers.checkpoint import load_model_state
from tokensift.trainers.config import TrainConfig
from tokensift.trainers.losses import token_cross_entropy
from tokensift.trainers.metrics import read_metrics
from tokensift.trainers.step import forward_logits

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = ROOT / "examples" / "ablate" / "train.yaml"


def bits(nats: float) -> float:
    return nats / math.log(2)


def train_config(snapshot: Path, out_dir: Path, seed: int, overrides: list[str]) -> TrainConfig:
    return load(TrainConfig, TRAIN_CONFIG, [f"out_dir={out_dir}", f"data.snapshot={snapshot}", f"seed={seed}", *overrides])


def train_arm(snapshot: Path, out_dir: Path, seed: int, overrides: list[str]) -> tuple[torch.nn.Module, dict]:
    """Train on ``snapshot``; returns the trained model (eval mode) and run stats.

    Stats: ``tokens`` (label positions seen), ``backprop_tokens`` (positions with non-zero weight, i.e. the
    tokens whose loss is back-propagated), ``seconds`` (wall time of ``train``), ``train_loss`` (last step).
    """
    from tokensift.trainers.train import build_model, train

    cfg = train_config(snapshot, out_dir, seed, overrides)
    metrics = Path(out_dir) / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    t0 = time.perf_counter()
    last = train(cfg)
    seconds = time.perf_counter() - t0
    records = read_metrics(metrics)
    model = build_model(cfg)
    model.load_state_dict(load_model_state(Path(out_dir) / "checkpoints"))
    return model.eval(), {
        "tokens": sum(r["tokens"] for r in records),
        "backprop_tokens": sum(r["kept_fraction"] * r["tokens"] for r in records),
        "seconds": seconds,
        "train_loss": last["loss"],
    }


def write_eval_snapshot(table: pa.Table, out: Path, tokenizer_params, mask_prompt: bool = False) -> Path:
    """Tokenize ``table`` (``tokensift.pipeline.tokenize``) into ``out/data``; with ``mask_prompt`` the
    prompt tokens get ``token_weights`` 0 so only responses are scored."""
    import numpy as np

    from tokensift.pipeline.tokenize import Tokenize

    t = Tokenize(tokenizer_params)(table)
    if mask_prompt:
        lengths = t.column("n_tokens").to_pylist()
        plens = t.column(schema.PROMPT_LENGTH).to_pylist()
        w = [np.r_[np.zeros(p, np.float32), np.ones(n - p, np.float32)] for n, p in zip(lengths, plens, strict=True)]
        t = t.append_column(schema.TOKEN_WEIGHTS, schema.ragged_column(w, schema.TOKEN_WEIGHTS_TYPE))
    return write_snapshot(t.select([c for c in t.column_names if c in (schema.ID, schema.INPUT_IDS, schema.TOKEN_WEIGHTS)]),
                          out)


def write_snapshot(table: pa.Table, out: Path, **fields) -> Path:
    """``table`` as a one-shard snapshot (``out/data``, ``out/manifest.json`` with ``fields``) the loaders read."""
    from tokensift.pipeline.shards import write_manifest

    (Path(out) / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, Path(out) / "data" / "train-00000-of-00001.parquet")
    write_manifest(str(out), **fields)
    return Path(out)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, eval_snapshot: Path, seq_len: int, batch_size: int = 16,
                 max_batches: int | None = None) -> float:
    """Weighted mean cross-entropy (nats per scored token) of ``model`` on one pass over ``eval_snapshot``."""
    model.eval()
    loader = TokenLoader(eval_snapshot, seq_len, batch_size, epochs=1, shuffle=False, mask_doc_boundary=True)
    total, weight = 0.0, 0.0
    for n, batch in enumerate(loader):
        if max_batches is not None and n >= max_batches:
            break
        ce = token_cross_entropy(forward_logits(model, model, batch), batch["labels"])
        total += float((ce * batch["loss_weights"]).sum())
        weight += float(batch["loss_weights"].sum())
    if weight == 0:
        raise ValueError(f"{eval_snapshot}: no scored token in the evaluation batches (too few tokens for one batch?)")
    return total / weight


def eval_snapshots(work: Path, target: str, domains) -> dict[str, Path]:
    """Byte-token evaluation snapshots, one per domain: its heldout rows (for ``target``, the evaluation half
    only: the other half may steer a selector)."""
    from bench.ablate_select import read_split, target_split
    from tokensift.pipeline.tokenize import TokenizeParams

    out = {}
    for d in domains:
        table = read_split(True, [d])
        table = target_split(table)[1] if d == target else table
        out[d] = write_eval_snapshot(table, Path(work) / "eval_bytes" / d, TokenizeParams(tokenizer="byte", max_length=4096))
    return out


def arm_bits(snapshot: Path, out_dir: Path, seed: int, overrides: list[str], evals: dict[str, Path],
             eval_batches: int, seq_len: int | None = None, batch_size: int = 16) -> dict:
    """Train ``examples/ablate/train.yaml`` (+ ``overrides``) on ``snapshot``; :func:`train_arm`'s stats plus
    ``bits``: held-out bits per byte per domain (``seq_len``-token rows, default the GPT's context) and their
    ``mean``."""
    model, stats = train_arm(snapshot, out_dir, seed, overrides)
    seq_len = seq_len or model.config.block_size
    stats["bits"] = {d: bits(heldout_loss(model, e, seq_len, batch_size, max_batches=eval_batches))
                     for d, e in evals.items()}
    stats["bits"]["mean"] = sum(stats["bits"][d] for d in evals) / len(evals)
    return stats
