import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokensift.scorers import critical


def test_contrastive_score_equals_the_normalised_likelihood_ratio():
    g = torch.Generator().manual_seed(0)
    zp, zn = torch.randn(3, 9, generator=g, dtype=torch.float64), torch.randn(3, 9, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 4, 8])
    s = critical.contrastive_scores(zp, zn, y, beta=1.0)
    pp, pn = zp.softmax(-1), zn.softmax(-1)
    ratio = pp**2 / pn  # p_pos^(1+b) / p_neg^b with b = 1
    oracle = (ratio / ratio.sum(-1, keepdim=True)).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(s.double(), oracle, rtol=1e-5, atol=1e-7)


def test_token_dpo_loss_both_forms_hand_computed():
    # one pair, 3 positions; position 0 is the prompt (masked)
    pc, pr = torch.tensor([[0.0, -1.0, -2.0]]), torch.tensor([[0.0, -1.5, -0.5]])
    rc, rr = torch.tensor([[0.0, -1.2, -2.1]]), torch.tensor([[0.0, -1.0, -1.0]])
    m = torch.tensor([[False, True, True]])
    w = torch.tensor([[1.0, 0.2, 0.9]])
    # chosen log-ratios 0.2, 0.1; rejected -0.5, 0.5 weighted 0.2, 0.9 -> -0.1, 0.45
    seq = -math.log(1 / (1 + math.exp(-0.1 * ((0.2 + 0.1) - (-0.1 + 0.45)))))
    got = critical.token_dpo_loss(pc, pr, rc, rr, m, m, w, beta=0.1, form="sequence")
    assert got.item() == pytest.approx(seq, rel=1e-5)
    per_pos = [0.0, 0.2 - (-0.1), 0.1 - 0.45]
    pos = np.mean([-math.log(1 / (1 + math.exp(-0.1 * v))) for v in per_pos])  # masked position adds log 2
    got = critical.token_dpo_loss(pc, pr, rc, rr, m, m, w, beta=0.1, form="position")
    assert got.item() == pytest.approx(pos, rel=1e-5)
    ones = torch.ones_like(w)
    dpo = -F.logsigmoid(0.1 * ((pc - rc)[m].sum() - (pr - rr)[m].sum()))
    assert critical.token_dpo_loss(pc, pr, rc, rr, m, m, ones).item() == pytest.approx(dpo.item())
    with pytest.raises(ValueError, match="form"):
        critical.token_dpo_loss(pc, pr, rc, rr, m, m, w, form="token")


ANSWER = "He buys 3*4=<<3*4=12>>12 eggs.\nThen 12+5=<<12+5=17>>17.\n#### 17"


def test_rejected_answer_corrupts_the_final_number_or_one_step_deterministically():
    import random

    import pyarrow as pa

    from tokensift.scorers import rejected

    bad = rejected.corrupt(ANSWER, "final_number", random.Random(0))
    assert bad.rsplit("#### ", 1)[0] == ANSWER.rsplit("#### ", 1)[0] and bad.rsplit("#### ", 1)[1] != "17"
    step = rejected.corrupt(ANSWER, "step", random.Random(1))
    changed = [a for a, b in zip(ANSWER.splitlines(), step.splitlines(), strict=True) if a != b]
    assert len(changed) == 2 and changed[-1] == "#### 17"  # one calculation and the final answer
    assert rejected.corrupt("no final answer", "final_number", random.Random(0)) is None
    stage = rejected.RejectedAnswer(rejected.RejectedAnswerParams(mode="step"))
    batch = pa.table({"id": ["a", "b"], "response": [ANSWER, ANSWER]})
    out = stage(batch).column("rejected").to_pylist()
    assert out == stage(batch).column("rejected").to_pylist() and all(o != ANSWER for o in out)
    with pytest.raises(ValueError, match="row 0"):
        stage(pa.table({"id": ["c"], "response": ["plain"]}))


@pytest.mark.slow
def test_stage_tunes_its_models_and_weights_the_rejected_side_of_pairs(smollm2, tmp_path):
    """cDPO's contrastive estimation end to end: positive/negative copies of SmolLM2 tuned on correct and on
    subtracting trajectories; the rejected side of a held-out pair gets its largest weight 1 - s_t on '-' (the
    token that makes it wrong), and the correct side never gets a weight that high."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokensift.pipeline.tokenize import Tokenize, TokenizeParams

    _, tok = smollm2
    pairs = [(7, 5), (9, 4), (8, 3), (6, 2), (12, 7), (15, 6), (11, 8), (14, 9)]

    def row(a, b):
        return {"prompt": f"Tom has {a} apples and gets {b} more. How many apples does he have?\n",
                "response": f"He has {a} + {b} = {a + b} apples. The answer is {a + b}.",
                "rejected": f"He has {a} - {b} = {a - b} apples. The answer is {a - b}."}

    pq.write_table(pa.Table.from_pylist([row(a, b) for a, b in pairs]), tmp_path / "tune.parquet")
    params = critical.CriticalParams(tune_paths=[str(tmp_path / "tune.parquet")], tune_steps=6, tune_lr=3e-4,
                                     tune_last_layers=2, pairs=True, max_length=64)
    stage = critical.CriticalStage(params)
    held_out = pa.Table.from_pylist([{**row(13, 4), "text": ""}])
    batch = Tokenize(TokenizeParams(tokenizer=tok.name_or_path, prompt_column="prompt", response_column="response",
                                    rejected_column="rejected"))(held_out)
    out = stage(batch)
    w = np.asarray(out.column("rejected_token_weights").to_pylist()[0])
    ids = out.column("rejected_input_ids").to_pylist()[0]
    p = out.column("prompt_length").to_pylist()[0]
    assert len(w) == len(ids) and np.all(w[:p] == 0) and critical.CriticalStage.adds(params) == ["rejected_token_weights"]
    assert tok.decode([ids[int(np.argmax(w))]]).strip() == "-"
    chosen = np.asarray(out.column("input_ids").to_pylist()[0])
    assert critical.critical_weights(stage.pos, stage.neg, [chosen], [p])[0].max() < w.max()
