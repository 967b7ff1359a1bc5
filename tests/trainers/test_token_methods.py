"""Token methods in the trainer on real text (GSM8K rows of the sample corpus as byte tokens): prompt masks,
online ssToken on the real prompt boundary, scorer state across a resume, and cDPO's token-level DPO."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tokensift.config import load
from tokensift.models.gpt import GPT
from tokensift.models.gpt_config import GPTConfig
from tokensift.pipeline.loader import TokenLoader
from tokensift.pipeline.shards import write_manifest
from tokensift.pipeline.tokenize import Tokenize, TokenizeParams
from tokensift.scorers.critical import token_dpo_loss
from tokensift.scorers.online import get_online_scorer
from tokensift.scorers.rejected import RejectedAnswer, RejectedAnswerParams
from tokensift.trainers.checkpoint import load_model_state
from tokensift.trainers.config import TrainConfig
from tokensift.trainers.dpo import dpo_micro_batch_loss
from tokensift.trainers.metrics import read_metrics
from tokensift.trainers.pairs import PairLoader
from tokensift.trainers.step import micro_batch_loss
from tokensift.trainers.train import train

GPT_ARGS = ["model.gpt.vocab_size=257", "model.gpt.block_size=64", "model.gpt.n_layer=2", "model.gpt.n_head=2",
            "model.gpt.n_embd=32"]
DIGITS = set(b"0123456789")
PAIR_LEN = 512  # a GSM8K pair side is ~500 bytes: pairs are not packed, each side fills one row
PAIR_ARGS = (f"data.seq_len={PAIR_LEN}", f"model.gpt.block_size={PAIR_LEN}", "data.micro_batch_size=4")

pytestmark = pytest.mark.usefixtures("remove_shm_buffers")


def _digit_weights(ids: list[int]) -> np.ndarray:
    """A class code for RFT / a critical weight stand-in: 1 on digits (the reasoning), 0.5 elsewhere."""
    return np.asarray([1.0 if t in DIGITS else 0.5 for t in ids], np.float32)


def _snapshot(out, table: pa.Table):
    (out / "data").mkdir(parents=True)
    pq.write_table(table, out / "data" / "train-00000-of-00001.parquet")
    write_manifest(str(out))
    return out


@pytest.fixture(scope="module")
def gsm8k(sample_dir) -> pa.Table:
    """60 GSM8K question/answer rows with a rejected answer (the final number corrupted)."""
    rows = pq.read_table(sample_dir / "math.parquet", columns=["id", "text", "prompt", "response"]).slice(0, 60)
    return RejectedAnswer(RejectedAnswerParams())(rows)


@pytest.fixture(scope="module")
def sft_snapshot(gsm8k, tmp_path_factory):
    """Prompt/response rows through the tokenize stage (``loss_mask``), with digit-coded ``token_weights``."""
    t = Tokenize(TokenizeParams(prompt_column="prompt", response_column="response", max_length=1024))(gsm8k)
    w = [_digit_weights(r) for r in t.column("input_ids").to_pylist()]
    t = t.append_column("token_weights", pa.array([x.tolist() for x in w], pa.list_(pa.float32())))
    return _snapshot(tmp_path_factory.mktemp("sft"), t.drop_columns(["rejected"]))


@pytest.fixture(scope="module")
def pair_snapshot(gsm8k, tmp_path_factory):
    """Preference pairs (correct vs corrupted answer), rejected tokens weighted 1 on digits, 0.5 elsewhere."""
    t = Tokenize(TokenizeParams(prompt_column="prompt", response_column="response", rejected_column="rejected",
                                max_length=PAIR_LEN + 1))(gsm8k)
    w = [_digit_weights(r).tolist() for r in t.column("rejected_input_ids").to_pylist()]
    return _snapshot(tmp_path_factory.mktemp("pairs"), t.append_column("rejected_token_weights", pa.array(w, pa.list_(pa.float32()))))


def _cfg(snapshot, out, *extra):
    return load(TrainConfig, None, [f"out_dir={out}", f"data.snapshot={snapshot}", "data.seq_len=64",
                                    "data.micro_batch_size=4", "optim.lr=3e-3", "progress=false", *GPT_ARGS, *extra])


def _gpt(block_size: int = 64) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=257, block_size=block_size, n_layer=2, n_head=2, n_embd=32))


def test_sstoken_in_the_trainer_keeps_only_response_tokens_of_each_document(sft_snapshot):
    """On a tokenize-stage SFT snapshot the kept labels are the top ceil(rho*|R|) of each document's response
    in the row: never a prompt label (the old scorer took every positive-weight label for response)."""
    batch = next(iter(TokenLoader(str(sft_snapshot), 64, 4, seed=1)))
    assert bool((batch["loss_mask"] == 0).any()) and int(batch["document_ids"].max()) >= 1  # prompts, packed docs
    model = _gpt()
    batch["loss_weights"] = batch["loss_weights"] * batch["loss_mask"]  # data.mask_prompt
    scorer = get_online_scorer("sstoken", {"rho": 0.5, "gamma": 0.5})
    _, _, weights = micro_batch_loss(model, model, batch, scorer)
    kept = weights > 0
    assert not bool((kept & (batch["loss_mask"] == 0)).any())
    response = (batch["loss_weights"] > 0) & (batch["loss_mask"] == 1)
    for b in range(4):
        for d in torch.unique(batch["document_ids"][b][response[b]]):
            in_doc = response[b] & (batch["document_ids"][b] == d)
            assert int((kept[b] & in_doc).sum()) == math.ceil(0.5 * int(in_doc.sum()))


def test_mask_prompt_trains_on_responses_only(sft_snapshot, tmp_path):
    masked = train(_cfg(sft_snapshot, tmp_path / "masked", "max_steps=1", "grad_accum=8"))
    full = train(_cfg(sft_snapshot, tmp_path / "full", "max_steps=1", "grad_accum=8", "data.mask_prompt=false"))
    it = iter(TokenLoader(str(sft_snapshot), 64, 4))  # the same 8 micro-batches
    batches = [next(it) for _ in range(8)]
    response = sum(int(((b["loss_weights"] > 0) & (b["loss_mask"] == 1)).sum()) for b in batches) / (8 * 4 * 64)
    assert full["kept_fraction"] > 0.99  # every label but document starts
    assert masked["kept_fraction"] == response and 0.3 < response < 0.8  # GSM8K answers: ~55% of the bytes


SCORERS = {
    "eslm": ["scorer.name=eslm", "scorer.params.alpha=0.5"],
    "eslm_risk_share": ["scorer.name=eslm", "scorer.params.alpha_rule=risk_share", "scorer.params.smoothing=0.5"],
    "sstoken": ["scorer.name=sstoken", "scorer.params.history=ema", "scorer.params.ema_decay=0.5",
                "scorer.params.rel_warmup_steps=1"],
    "rft": ["scorer.name=rft"],
}


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_training_stopped_after_a_checkpoint_resumes_bit_exactly(sft_snapshot, tmp_path, name):
    """Stop at step 2 (checkpoint), resume to 4: metrics and weights equal an uninterrupted run bit for bit.
    Without the scorer's state (risk-share alpha, ssToken's step counter and EMA history) they differ."""
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    args = ("optim.schedule=constant", *SCORERS[name])  # the run cut at step 2 must have the same schedule
    train(_cfg(sft_snapshot, straight, "max_steps=4", *args))
    train(_cfg(sft_snapshot, parts, "max_steps=2", *args))
    train(_cfg(sft_snapshot, parts, "max_steps=4", *args))
    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(parts / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    drop = ("tokens_per_s", "step_time_s")
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in rb.items() if k not in drop} == {k: v for k, v in ra.items() if k not in drop}
    wa = load_model_state(straight / "checkpoints", "step_00000004")
    wb = load_model_state(parts / "checkpoints", "step_00000004")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _independent_logps(model: GPT, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(ids).double(), -1).gather(-1, labels[..., None]).squeeze(-1)


@pytest.mark.parametrize("form", ["sequence", "position"])
def test_trainer_dpo_loss_equals_token_dpo_loss_on_the_same_batch(pair_snapshot, form):
    policy, reference = _gpt(PAIR_LEN), _gpt(PAIR_LEN)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = next(iter(PairLoader(str(pair_snapshot), PAIR_LEN, 4)))
    loss, stats = dpo_micro_batch_loss(policy, reference, batch, beta=0.1, form=form)
    lp = {s: _independent_logps(policy, batch[f"{s}_input_ids"], batch[f"{s}_labels"]) for s in ("chosen", "rejected")}
    with torch.no_grad():
        lr = {s: _independent_logps(reference, batch[f"{s}_input_ids"], batch[f"{s}_labels"]) for s in ("chosen", "rejected")}
    expect = token_dpo_loss(lp["chosen"], lp["rejected"], lr["chosen"], lr["rejected"], batch["chosen_mask"],
                            batch["rejected_mask"], batch["rejected_weights"].double(), beta=0.1, form=form)
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    assert stats["pairs"] == 4
    # the rejected side is weighted: digits 1, other tokens 0.5, padding and prompt masked
    assert set(batch["rejected_weights"][batch["rejected_mask"]].unique().tolist()) == {0.5, 1.0}


def test_token_dpo_training_grows_the_chosen_vs_rejected_margin(pair_snapshot, tmp_path):
    train(_cfg(pair_snapshot, tmp_path, "objective=token_dpo", "max_steps=6", "optim.lr=1e-2", *PAIR_ARGS))
    r = read_metrics(tmp_path / "metrics.jsonl")
    assert r[0]["dpo/margin"] == 0.0 and r[0]["loss"] == pytest.approx(math.log(2))  # policy == reference
    margins = [x["dpo/margin"] for x in r]
    assert margins[-1] > margins[1] > 0 and r[-1]["dpo/reward_accuracy"] >= 0.75
    assert r[-1]["loss"] < math.log(2) - 0.05


def test_pair_loader_shards_and_resumes(pair_snapshot):
    one = PairLoader(str(pair_snapshot), PAIR_LEN, 4, seed=3)
    it = iter(one)
    first = [next(it) for _ in range(3)]
    ranks = [iter(PairLoader(str(pair_snapshot), PAIR_LEN, 2, rank=r, world_size=2, seed=3)) for r in range(2)]
    for batch in first:
        parts = [next(r) for r in ranks]
        together = torch.cat([p["chosen_input_ids"] for p in parts])
        assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, batch["chosen_input_ids"].tolist()))
    resumed = PairLoader(str(pair_snapshot), PAIR_LEN, 4, seed=3)
    resumed.load_state_dict({**one.state_dict(), "pairs": 8})
    assert torch.equal(next(iter(resumed))["rejected_input_ids"], first[2]["rejected_input_ids"])
    with pytest.raises(ValueError, match="seed"):
        resumed.load_state_dict({**one.state_dict(), "seed": 4})
