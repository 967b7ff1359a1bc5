"""Pieces of the ablation harness (bench/ablate*.py) that do not need the whole run: the equal-token-budget
cut, the target split, the verdict, PreSelect's family scoring, the byte LM's tokenizer, the report's reading
bound to its run, and training + held-out evaluation of a 2-layer GPT with the DeepSpeed trainer on real text."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bench import ablate
from bench.ablate_family import cut, gpt_nll
from bench.ablate_report import verdict
from bench.ablate_select import budget_cut, ranked_by_score, target_split
from bench.ablate_train import heldout_loss, train_arm, write_eval_snapshot
from tokensift.pipeline.tokenize import TokenizeParams

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


def test_family_scores_the_same_prefix_under_every_model():
    text = "é" * 200  # 2 bytes a character: 127 whole characters fit 255 bytes, never half of one
    assert cut(text) == "é" * 127 and cut("short") == "short"
    torch.manual_seed(0)
    from tokensift.models.gpt import GPT
    from tokensift.models.gpt_config import GPTConfig

    model = GPT(GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)).eval()
    texts = ["abc", "hello world", "x"]
    got = gpt_nll(model, texts, rows=2)  # padded batches of 2 and 1
    for text, nll in zip(texts, got, strict=True):
        ids = torch.tensor([[256, *text.encode()]])
        with torch.no_grad():
            expected = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:], reduction="sum")
        assert nll == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="longer than the GPT's context"):
        gpt_nll(model, ["y" * 16])


def test_ranking_is_by_descending_score_then_id(tmp_path):
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"id": ["c", "a", "b", "d"], "s": [0.5, 0.9, 0.5, 0.1]}), tmp_path / "data" / "p.parquet")
    assert ranked_by_score(tmp_path, "s") == ["a", "b", "c", "d"]


def test_a_reading_is_shown_only_under_the_run_it_reads(tmp_path, monkeypatch):
    reading = tmp_path / "reading.md"
    monkeypatch.setattr(ablate, "READING", reading)
    monkeypatch.setattr(ablate, "HERE", tmp_path)
    reading.write_text("Run: 2026-12-01T00:00:00Z\nPreSelect wins on math.\n")
    assert "PreSelect wins on math." in ablate._reading("2026-12-01T00:00:00Z")
    stale = "\n".join(ablate._reading("2026-12-02T00:00:00Z"))
    assert "PreSelect wins" not in stale and "No reading of run 2026-12-02T00:00:00Z yet" in stale


def test_render_rewrites_the_report_from_its_json_with_the_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(ablate, "READING", tmp_path / "reading.md")
    monkeypatch.setattr(ablate, "HERE", tmp_path)
    out = tmp_path / "report.md"
    meta = {"run_id": "2026-12-01T00:00:00Z", "command": "python -m bench.ablate", "machine": "m", "mode": "full",
            "from_scratch": True, "wall_minutes": 71.4, "parts": {"votek": {"seconds": 60, "data": {"unavailable": "x"}}}}
    out.with_suffix(".json").write_text(json.dumps(meta))
    (tmp_path / "reading.md").write_text("Run: 2026-12-01T00:00:00Z\nvote-k wins at k=5.\n")
    assert ablate.main(["--render", "--out", str(out)]) == 0
    text = out.read_text()
    assert "wall time 71.4 min" in text and "Unavailable: x" in text and "vote-k wins at k=5." in text
    assert json.loads(out.with_suffix(".json").read_text())["parts"] == meta["parts"]


def test_default_report_path_is_the_whole_full_run_only():
    assert ablate.parse([]).out == ablate.HERE / "ablations.md"
    assert ablate.parse(["--parts", "votek"]).out == Path("runs/ablate/votek.md")
    assert ablate.parse(["--quick"]).out.name == "-".join(ablate.PARTS) + "-quick.md"


def test_byte_lm_tokenizer_gives_the_byte_tokenizers_ids(tmp_path):
    from transformers import AutoTokenizer

    from bench.ablate_bytelm import byte_tokenizer, initial_model
    from tokensift.pipeline.tokenize import Tokenize, TokenizeParams

    text = "Héllo wörld\n\t  $x_1$ 漢字"
    path = initial_model(tmp_path / "lm", layers=1, width=16, heads=2, context=32)
    for tok in (byte_tokenizer(), AutoTokenizer.from_pretrained(path)):
        assert tok(text, add_special_tokens=False)["input_ids"] == list(text.encode())
        assert tok.decode(list(text.encode())) == text and tok.eos_token_id == 256
    piped = Tokenize(TokenizeParams(tokenizer="byte"))(pa.table({"id": ["a"], "text": [text]}))
    assert piped.column("input_ids").to_pylist()[0] == [*text.encode(), 256]
