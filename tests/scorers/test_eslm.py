import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from tokensift.models.causal_lm import token_losses
from tokensift.pipeline import schema
from tokensift.scorers import eslm
from tokensift.scorers.online import get_online_scorer


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.3, 0.5, 0.77, 0.95])
def test_select_mask_keeps_exactly_the_top_share_of_valid_tokens(alpha):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(4, 25, generator=g)
    valid = torch.rand(4, 25, generator=g) > 0.3
    keep = eslm.select_mask(scores, alpha, valid)
    n = int(valid.sum())
    k = math.ceil((1 - alpha) * n - 1e-9)
    assert int(keep.sum()) == k and not bool((keep & ~valid).any())
    oracle = np.sort(scores[valid].numpy())[::-1][:k]  # the k largest valid scores
    assert np.array_equal(np.sort(scores[keep].numpy())[::-1], oracle)


def test_select_mask_ties_and_bad_alpha():
    s = torch.tensor([1.0, 2.0, 2.0, 3.0])
    assert eslm.select_mask(s, 0.5).tolist() == [False, True, True, True]  # ties at VaR all kept
    assert eslm.select_mask(s, 0.5, torch.zeros(4, dtype=torch.bool)).sum() == 0
    with pytest.raises(ValueError, match="alpha"):
        eslm.select_mask(s, 1.0)


def test_cvar_is_the_upper_tail_mean_and_alpha_zero_is_clm():
    losses = torch.tensor([1.0, 5.0, 2.0, 4.0, 3.0])
    assert eslm.cvar(losses, 0.6).item() == pytest.approx(4.5)  # top 2 of 5: (5 + 4) / 2
    assert eslm.cvar(losses, 0.0).item() == pytest.approx(3.0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, generator=g) * 4
    var = torch.sort(x, descending=True).values[9]  # alpha = 0.75 keeps 10 of 40
    rockafellar_uryasev = var + torch.clamp(x - var, min=0).mean() / 0.25
    assert eslm.cvar(x, 0.75).item() == pytest.approx(rockafellar_uryasev.item(), rel=1e-6)


def test_entropy_scores_hand_computed():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -1e4, -1e4]])
    h = eslm.risk_scores("entropy", torch.zeros(2), logits)
    assert h[0].item() == pytest.approx(math.log(4))
    assert h[1].item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), abs=1e-6)
    with pytest.raises(ValueError, match="score"):
        eslm.risk_scores("margin", torch.zeros(2), logits)


def test_online_scorer_keeps_top_losses_and_our_risk_share_rule():
    scorer = get_online_scorer("eslm", {"alpha": 0.5})
    loss = torch.tensor([[4.0, 1.0, 3.0, 2.0, 9.0, 0.5]])
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 1.0]])  # the 9.0 is padding and must stay out
    out = scorer(loss, None, w, {}, None)
    assert out.tolist() == [[1.0, 0.0, 1.0, 1.0, 0.0, 0.0]]
    assert scorer.stats()["eslm/kept_fraction"] == pytest.approx(0.6)
    # risk share: scores 4,3,2,1 (total 10); 0.7 of the risk is in the top 2 -> alpha* = 1 - 2/4
    assert eslm.risk_share_alpha(torch.tensor([1.0, 4.0, 2.0, 3.0]), 0.7) == pytest.approx(0.5)
    assert eslm.risk_share_alpha(torch.ones(10), 0.8) == pytest.approx(0.2)  # uniform risk: keep 80%
    ada = get_online_scorer("eslm", {"alpha": 0.2, "alpha_rule": "risk_share", "risk_share": 0.7, "smoothing": 0.5})
    ada(torch.tensor([[1.0, 4.0, 2.0, 3.0]]), None, torch.ones(1, 4), {}, None)
    ada.on_step_end(None)
    assert ada.alpha == pytest.approx(0.5 * 0.2 + 0.5 * 0.5)
    again = get_online_scorer("eslm", {"alpha": 0.2, "alpha_rule": "risk_share"})
    again.load_state_dict(ada.state_dict())
    assert again.alpha == ada.alpha
    with pytest.raises(Exception, match="alpah"):
        get_online_scorer("eslm", {"alpah": 0.3})


def test_offline_stage_keeps_the_highest_loss_response_tokens(smollm2):
    model, tok = smollm2
    texts = ["The cat sat on the mat because it was warm.", "Paris is the capital of France and a large city."]
    rows = [np.asarray(tok(t)["input_ids"], np.int32) for t in texts]
    batch = pa.table(
        {
            schema.INPUT_IDS: schema.ragged_column(rows, schema.TOKEN_IDS_TYPE),
            schema.PROMPT_LENGTH: pa.array([0, 4], pa.int32()),
        }
    )
    stage = eslm.ESLMStage(eslm.ESLMStageParams(alpha=0.6))
    out = stage(batch).column(schema.TOKEN_WEIGHTS).to_pylist()
    oracle = token_losses(model, [list(r) for r in rows])  # oracle[t] is the loss of token t + 1
    for w, r, p, lo in zip(out, rows, [0, 4], oracle, strict=True):
        w = np.asarray(w)
        start = max(p, 1)
        assert len(w) == len(r) and np.all(w[:start] == 0)
        scored = lo[start - 1 :]
        k = math.ceil(0.4 * len(scored) - 1e-9)
        assert w.sum() == k
        kept = np.flatnonzero(w) - 1
        cand = np.arange(start - 1, len(lo))
        assert set(kept) == set(cand[np.argsort(-lo[cand])[:k]])
