import copy
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tokensift.pipeline import schema
from tokensift.pipeline.tokenize import Tokenize, TokenizeParams
from tokensift.scorers import finetune, shad
from tokensift.scorers.online import get_online_scorer


def test_shuffle_pairs_is_a_derangement_of_responses():
    seqs = [np.array([10 * i, 10 * i + 1, 100 + i, 200 + i]) for i in range(5)]
    out, plens = shad.shuffle_pairs(seqs, np.full(5, 2), seed=3)
    assert [list(s[:2]) for s in out] == [list(s[:2]) for s in seqs]  # prompts stay in place
    responses = [int(s[2]) - 100 for s in out]
    assert sorted(responses) == list(range(5)) and all(r != i for i, r in enumerate(responses))
    assert list(plens) == [2] * 5
    with pytest.raises(ValueError, match="at least 2"):
        shad.shuffle_pairs(seqs[:1], np.array([2]))


def test_shad_weights_class_code():
    ld = np.array([0.0, 0.3, -0.2, 0.0, 1.5, -3.0], np.float32)
    assert shad.shad_weights(ld, 2, 0.5).tolist() == [0, 0, 0.5, 0.5, 1, 0.5]
    assert shad.shad_weights(ld, 0, 0.25).tolist() == [0, 1, 0.25, 0.25, 1, 0.25]


def test_rft_loss_hand_computed_and_limits():
    loss = torch.tensor([1.0, 1.0, 2.0, 4.0, 9.0])
    reasoning = torch.tensor([False, False, True, True, False])
    valid = torch.tensor([True, True, True, True, False])
    lb, lr = 1.0, 3.0
    wb, wr = 1 / (1 + math.exp((lr - lb) / 2)), 1 / (1 + math.exp((lb - lr) / 2))
    assert shad.rft_loss(loss, reasoning, valid, tau=2.0).item() == pytest.approx(wb * lb + wr * lr)
    assert shad.rft_loss(loss, reasoning, valid, tau=1e9).item() == pytest.approx((lb + lr) / 2)
    assert shad.rft_loss(loss, torch.zeros(5, dtype=torch.bool), valid, 2.0).item() == pytest.approx(2.0)
    # the online form gives the same loss through the trainer's sum(w * ce) / sum(w)
    weights = torch.tensor([[0.5, 0.5, 1.0, 1.0, 0.0]])
    out = get_online_scorer("rft", {"tau": 2.0})(loss[None], None, weights, {}, None)
    assert ((out * loss).sum() / out.sum()).item() == pytest.approx(wb * lb + wr * lr)
    assert out.sum().item() == pytest.approx(4.0)


TUNE_WORDS = ["apple", "river", "garden", "silver", "planet", "window", "doctor", "market", "yellow", "castle", "pencil", "summer"]
HELD_OUT_WORDS = ["orange", "valley", "winter", "hammer", "basket", "violin", "rabbit", "copper"]


def _agent_rows(words=TUNE_WORDS):
    """Template responses around one input-dependent answer (the word given in the prompt)."""
    prompts = [f"Word: {w}\nRepeat the word." for w in words]
    responses = [f"Sure! The word you gave me is {w}. Done." for w in words]
    return pa.table({"id": words, "text": prompts, "prompt": prompts, "response": responses})


@pytest.fixture(scope="module")
def agent_data(smollm2):
    _, tok = smollm2
    tokenize = Tokenize(TokenizeParams(tokenizer=tok.name_or_path, prompt_column="prompt", response_column="response"))
    rows, held_out = _agent_rows(), tokenize(_agent_rows(HELD_OUT_WORDS))
    batch = tokenize(rows)
    seqs = [np.asarray(r, np.int64) for r in batch.column(schema.INPUT_IDS).to_pylist()]
    plens = batch.column(schema.PROMPT_LENGTH).to_numpy().astype(np.int64)
    head = len(tok("Sure! The word you gave me is", add_special_tokens=False)["input_ids"])
    return rows, batch, seqs, plens, head, held_out


@pytest.mark.slow
def test_shad_marks_template_tokens_boilerplate_and_answers_reasoning(smollm2, agent_data):
    """The original model is SmolLM2 briefly tuned on the correctly paired rows (a model that knows the task, as
    the paper's 8B models do); its shuffle-tuned copy keeps the template but loses the input -> answer link.
    Labelled: held-out rows (as SHAD labels the ~99% of the data it was not shuffle-tuned on)."""
    model, _ = smollm2
    _, _, seqs, plens, head, held_out = agent_data
    original = copy.deepcopy(model)
    finetune.finetune_lm(original, seqs, plens, steps=3, lr=1e-3, batch_size=6, last_layers=2, seed=1)
    shuffled = shad.shuffle_tune(original, seqs, plens, steps=12, lr=1e-3, batch_size=6, last_layers=2, seed=0)
    test_seqs = [np.asarray(r, np.int64) for r in held_out.column(schema.INPUT_IDS).to_pylist()]
    lds = shad.loss_difference(original, shuffled, test_seqs)
    template = answer = n_template = 0
    for s, ld, p in zip(test_seqs, lds, held_out.column(schema.PROMPT_LENGTH).to_pylist(), strict=True):
        w = shad.shad_weights(ld, p, 0.5)
        assert len(w) == len(s) and not w[:p].any()
        answer += w[p + head] == 1.0  # the first token of the word: depends on the input
        template += (w[p : p + head] == 0.5).sum()
        n_template += head
    assert template / n_template >= 0.8, f"template tokens marked boilerplate: {template}/{n_template}"
    assert answer / len(test_seqs) >= 0.75, f"answers marked reasoning: {answer}/{len(test_seqs)}"


def test_stage_reads_tunes_and_writes_class_coded_weights(agent_data, tmp_path):
    rows, batch, _, _, _, _ = agent_data
    pq.write_table(rows, tmp_path / "tune.parquet")
    stage = shad.SHADStage(
        shad.SHADParams(tune_paths=[str(tmp_path / "tune.parquet")], tune_fraction=0.1, tune_min_rows=4, tune_steps=1,
                        tune_batch_size=2, tune_last_layers=1, boilerplate_weight=0.25)
    )
    out = stage(batch.slice(0, 3))
    lds = shad.loss_difference(stage.model, stage.shuffled, [np.asarray(r) for r in out.column(schema.INPUT_IDS).to_pylist()])
    for w, ld, p in zip(out.column(schema.TOKEN_WEIGHTS).to_pylist(), lds, out.column(schema.PROMPT_LENGTH).to_pylist(), strict=True):
        assert w == shad.shad_weights(ld, p, 0.25).tolist() and set(w[p:]) <= {0.25, 1.0}
    with pytest.raises(ValueError, match="tune_paths"):
        shad.SHADStage(shad.SHADParams())
