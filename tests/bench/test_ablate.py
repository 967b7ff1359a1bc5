"""Pieces of the ablation harness (bench/ablate*.py) that do not need the whole run: the equal-token-budget
cut, the target split, the verdict, SHAD's response mask, and training + held-out evaluation of a 2-layer GPT
and of the token arms' HF decoder (with ssToken's attention term) with the DeepSpeed trainer on real text."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # bench/ is a top-level package of the repository, not installed

from bench.ablate_report import verdict  # noqa: E402
from bench.ablate_select import budget_cut, docs_for_budget, target_split  # noqa: E402
from bench.ablate_tokens import response_mask, tiny_decoder  # noqa: E402
from bench.ablate_train import heldout_loss, train_arm, write_eval_snapshot  # noqa: E402
from tokensift.pipeline.tokenize import TokenizeParams  # noqa: E402

TINY = ["model.gpt.n_embd=32", "model.gpt.n_head=2", "model.gpt.block_size=64", "data.seq_len=64",
        "data.micro_batch_size=4", "optim.lr=1e-2", "optim.warmup_steps=2"]


@pytest.fixture(autouse=True, scope="module")
def _remove_shm_buffers():
    yield
    port = os.environ.get("MASTER_PORT")
    for f in Path("/dev/shm").glob(f"deepspeed_*_{port}_*") if port else []:
        f.unlink(missing_ok=True)


def test_budget_cut_is_the_shortest_prefix_reaching_the_budget():
    tokens = {"a": 5, "b": 3, "c": 10, "d": 1}
    assert budget_cut(["a", "b", "c", "d"], tokens, 8) == ["a", "b"]  # 5 + 3 reaches 8 exactly
    assert budget_cut(["a", "b", "c", "d"], tokens, 9) == ["a", "b", "c"]
    assert budget_cut(["d", "a", "d", "b"], tokens, 9) == ["d", "a", "b"]  # a repeat (SIFT) counts once
    assert budget_cut(["b", "d"], tokens, 100) == ["b", "d"]  # never reached: everything it has
    with pytest.raises(KeyError, match="'z'"):
        budget_cut(["a", "z"], tokens, 100)


def test_docs_for_budget_covers_the_worst_case():
    tokens = {"a": 5, "b": 3, "c": 10, "d": 1}
    assert docs_for_budget(tokens, 8) == 3  # smallest two hold 1 + 3 = 4 < 8, smallest three 9
    assert docs_for_budget(tokens, 9) == 3
    assert docs_for_budget(tokens, 100) == 4


def test_target_split_is_disjoint_complete_and_stable(sample_dir):
    table = pq.read_table(sample_dir / "heldout" / "math.parquet")
    targets, evaluation = target_split(table)
    a, b = set(targets.column("id").to_pylist()), set(evaluation.column("id").to_pylist())
    assert not a & b and a | b == set(table.column("id").to_pylist())
    assert 0.35 < len(a) / table.num_rows < 0.65
    reversed_targets, _ = target_split(table.take(pa.array(np.arange(table.num_rows)[::-1])))
    assert set(reversed_targets.column("id").to_pylist()) == a  # by id hash, not by position


def test_verdict_uses_twice_the_standard_error():
    assert verdict([1.0, 1.1, 0.9], [2.0, 2.1, 1.9]).startswith("better")
    assert verdict([2.0, 2.1, 1.9], [1.0, 1.1, 0.9]).startswith("worse")
    assert verdict([1.0, 1.5, 0.5], [1.1, 1.6, 0.6]).startswith("no clear difference")
    assert verdict([0.5, 0.6], [0.7, 0.8], lower_is_better=False).startswith("worse")


def test_response_mask_keeps_both_shad_classes():
    w = pa.array([[0.0, 0.0, 0.5, 1.0], [0.0, 1.0, 0.5]], pa.list_(pa.float32()))
    t = response_mask(pa.table({"token_weights": w}))
    assert t.column("token_weights").to_pylist() == [[0, 0, 1, 1], [0, 1, 1]]


def test_eval_snapshot_masks_prompts(sample_dir, tmp_path):
    rows = pq.read_table(sample_dir / "heldout" / "math.parquet").slice(0, 3)
    params = TokenizeParams(tokenizer="byte", prompt_column="prompt", response_column="response")
    snap = write_eval_snapshot(rows, tmp_path, params, mask_prompt=True)
    got = pq.read_table(snap / "data")
    for prompt, ids, w in zip(rows.column("prompt").to_pylist(), got.column("input_ids").to_pylist(),
                              got.column("token_weights").to_pylist(), strict=True):
        p = len(prompt.encode())
        assert len(w) == len(ids) and set(w[:p]) == {0.0} and set(w[p:]) == {1.0}


def test_train_and_heldout_loss_on_a_2_layer_gpt(sample_dir, tmp_path):
    # documents cut to 200 bytes: every loader lane (a contiguous stretch of the stream) crosses boundaries
    params = TokenizeParams(tokenizer="byte", max_length=200)
    train = write_eval_snapshot(pq.read_table(sample_dir / "news.parquet").slice(0, 60), tmp_path / "train", params)
    heldout = write_eval_snapshot(pq.read_table(sample_dir / "heldout" / "news.parquet").slice(0, 20), tmp_path / "ho", params)
    model, stats = train_arm(train, tmp_path / "run", 0, ["max_steps=12", *TINY])
    assert stats["tokens"] == 12 * 4 * 64
    assert 0.95 * stats["tokens"] < stats["backprop_tokens"] < stats["tokens"]  # document boundaries are masked
    assert model.config.n_layer == 2 and not model.training
    trained = heldout_loss(model, heldout, 64, batch_size=4, max_batches=10)
    with torch.no_grad():  # a zero head predicts uniformly over 257 bytes: exactly ln 257 per token
        model.lm_head.weight.zero_()
    assert heldout_loss(model, heldout, 64, batch_size=4, max_batches=10) == pytest.approx(math.log(257), rel=1e-5)
    assert trained < math.log(257) - 1.0  # learned English bytes from 12 steps


def test_token_arms_decoder_trains_with_full_sstoken(sample_dir, tmp_path):
    """The token arms' HF decoder: full ssToken (gamma 0.5, with attention to the prompt) back-propagates
    about rho = 0.6 of what plain training does on the same batches; held-out loss reads HF logits."""
    params = TokenizeParams(tokenizer="byte", prompt_column="prompt", response_column="response", max_length=1000)
    train = write_eval_snapshot(pq.read_table(sample_dir / "math.parquet").slice(0, 40), tmp_path / "train", params,
                                mask_prompt=True)
    decoder = tiny_decoder(tmp_path / "decoder", vocab=257, seq_len=64, layers=1, width=32)
    common = ["max_steps=4", "model.kind=hf", f"model.path={decoder}", "data.seq_len=64", "data.micro_batch_size=4"]
    _, plain = train_arm(train, tmp_path / "plain", 0, common)
    model, scored = train_arm(train, tmp_path / "sstoken", 0, [*common, "scorer.name=sstoken"])
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert scored["tokens"] == plain["tokens"] == 4 * 4 * 64
    assert 0.5 * plain["backprop_tokens"] < scored["backprop_tokens"] < 0.7 * plain["backprop_tokens"]
    loss = heldout_loss(model, train, 64, batch_size=4, max_batches=2)
    assert abs(loss - math.log(257)) < 1.0  # near uniform over bytes after 4 steps from a random init
