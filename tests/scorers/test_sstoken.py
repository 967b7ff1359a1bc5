import copy
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from tokensift.models.causal_lm import token_losses
from tokensift.pipeline import schema
from tokensift.scorers import common, finetune, sstoken
from tokensift.scorers.online import get_online_scorer

# Kept response positions produced by the official ssToken release (``filter_tokens_with_attention_loss`` in
# jianke0604/ssToken@2a0c57d, run offline) on the seeded random cases of ``_case``.
RELEASE_FIXTURES = {
    0: [0],
    1: [1, 3, 4],
    2: [0, 1],
    3: [0, 1],
    4: [0],
    5: [0, 1],
    6: [0, 1, 2],
    7: [0, 1, 2],
}


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(4, 14, (1,), generator=g))
    p = int(torch.randint(1, T, (1,), generator=g))
    rho = float(torch.rand(1, generator=g)) * 0.9 + 0.05
    gamma = float(torch.rand(1, generator=g))
    logits = torch.randn(T, 7, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 7, (T,), generator=g)
    attn = torch.rand(T, T, generator=g, dtype=torch.float64).tril()
    attn = attn / attn.sum(-1, keepdim=True)
    hist = torch.rand(T, generator=g, dtype=torch.float64) * 3
    return T, p, rho, gamma, logits, ids, attn, hist


@pytest.mark.parametrize("seed", sorted(RELEASE_FIXTURES))
def test_selection_matches_the_official_release(seed):
    T, p, rho, gamma, logits, ids, attn, hist = _case(seed)
    cur = F.pad(F.cross_entropy(logits[:-1], ids[1:], reduction="none"), (1, 0))
    keep = sstoken.sstoken_keep(cur[p:], hist[p:], attn[p:, :p].sum(-1), rho, gamma)
    assert torch.nonzero(keep).flatten().tolist() == RELEASE_FIXTURES[seed]
    assert int(keep.sum()) == math.ceil(rho * (T - p))


def test_selection_hand_computed():
    cur = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    hist = torch.tensor([1.0, 3.0, 2.0, 1.5, 1.0])  # REL = 0, 2, 1, .5, 0 -> normalised 0, 1, .5, .25, 0
    attn = torch.tensor([0.9, 0.0, 0.1, 0.6, 0.2])
    # gamma .5: 0.45, 0.5, 0.35, 0.425, 0.1 -> top ceil(.6*5)=3: positions 1, 0, 3
    assert sstoken.sstoken_keep(cur, hist, attn, 0.6, 0.5).tolist() == [True, True, False, True, False]
    assert sstoken.sstoken_keep(cur, hist, attn, 0.4, 1.0).tolist() == [False, True, True, False, False]
    assert sstoken.sstoken_keep(cur, None, attn, 0.4, 0.0).tolist() == [True, False, False, True, False]


def test_captured_attention_equals_eager_attention_with_padding(smollm2):
    model, tok = smollm2
    m = copy.deepcopy(model)
    attn = sstoken.capture_last_attention(m)
    seqs = [np.asarray(tok(t)["input_ids"]) for t in ["Question: 2 + 2? Answer: 4", "Hi there"]]
    ids, mask = common.pad(seqs)
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=mask).logits
    got = attn.tokensift_attn
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        ref = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(logits, model(input_ids=ids, attention_mask=mask).logits, atol=1e-4, rtol=1e-4)
    for r, s in enumerate(seqs):
        n = len(s)
        torch.testing.assert_close(got[r, :n, :n], ref.attentions[-1][r].mean(0)[:n, :n].float(), atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def tuned_dir(smollm2, tmp_path_factory):
    """SmolLM2 after 3 steps on the response of one real sentence: the 'current' model vs the base history."""
    model, tok = smollm2
    cur = copy.deepcopy(model)
    seq = np.asarray(tok("Question: where is Paris?\nAnswer: Paris is the capital of France.")["input_ids"])
    finetune.finetune_lm(cur, [seq], np.array([8]), steps=3, lr=1e-4, batch_size=1, last_layers=2)
    out = tmp_path_factory.mktemp("sstoken-current")
    cur.save_pretrained(out)
    tok.save_pretrained(out)
    return out, seq


@pytest.mark.slow
def test_gamma_one_keeps_the_tokens_whose_loss_improved_most(smollm2, tuned_dir):
    model, _ = smollm2
    path, seq = tuned_dir
    stage = sstoken.SSTokenStage(sstoken.SSTokenStageParams(model=str(path), gamma=1.0, rho=0.6))
    batch = pa.table(
        {
            schema.INPUT_IDS: schema.ragged_column([seq.astype(np.int32)], schema.TOKEN_IDS_TYPE),
            schema.PROMPT_LENGTH: pa.array([8], pa.int32()),
        }
    )
    w = np.asarray(stage(batch).column(schema.TOKEN_WEIGHTS)[0].as_py())
    hist = token_losses(model, [list(seq)])[0]
    cur = token_losses(stage.model, [list(seq)])[0]
    gain = (hist - cur)[7:]  # loss index t is token t + 1; response tokens start at 8
    k = math.ceil(0.6 * len(gain))
    assert len(w) == len(seq) and np.all(w[:8] == 0) and w.sum() == k
    assert set(np.flatnonzero(w) - 8) == set(np.argsort(-gain)[:k])
    assert gain.max() > 0  # the fine-tune did change the response losses


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


# A hand-made packed row in the loader's contract: two documents, each a prompt then a response.
# inputs:       0  1  2  3  4 | 5  6  7  8  9      (document 0 | document 1)
# token kind:   p  p  r  r  r | p  p  p  r  r
# label t = token t+1: labels 1-3 are document 0's response, label 4 is document 1's first token (weight 0,
# predicted across the boundary), labels 5-6 its prompt, labels 7-9 its response (label 9 continues the row).
DOCS = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
LOSS_MASK = torch.tensor([[0, 1, 1, 1, 0, 0, 0, 1, 1, 1]])
WEIGHTS = torch.tensor([[1.0, 1, 1, 1, 0, 1, 1, 1, 1, 1]])


def _causal_attention(seed: int) -> torch.Tensor:
    """[1, 10, 10] attention probabilities that leak across the document boundary (a plain causal forward)."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(10, 10, generator=g, dtype=torch.float64) + 0.1).tril()
    return (a / a.sum(-1, keepdim=True))[None]


def test_attention_term_hand_computed_on_a_two_document_packed_row():
    attn = _causal_attention(0)
    got = sstoken.attention_to_prompt(attn, LOSS_MASK, DOCS)[0]
    a = attn[0]
    # document 0's response labels 1, 2, 3 read rows 2, 3, 4; its prompt tokens sit at inputs 0 and 1
    for t in (1, 2, 3):
        assert got[t].item() == pytest.approx((a[t + 1, 0] + a[t + 1, 1]).item(), rel=1e-6)
    # document 1's labels 7, 8 read rows 8, 9 (label 9, the row's last, reads row 9 too); its prompt tokens sit
    # at inputs 5, 6, 7; the mass is renormalised over document 1's own columns 5..row (no cross-document leak)
    for t, row in ((7, 8), (8, 9), (9, 9)):
        expect = a[row, 5:8].sum() / a[row, 5 : row + 1].sum()
        assert got[t].item() == pytest.approx(expect.item(), rel=1e-6)
    # the old inference from loss weights took "prompt" = zero-weight labels: here only label 4, i.e. input 5
    assert got[8].item() != pytest.approx(a[9, 5].item() / a[9, 5:].sum().item(), rel=1e-3)


def test_online_scorer_keeps_the_top_attention_to_each_documents_own_prompt():
    model = _tiny_llama()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (1, 10), generator=g)
    labels = torch.cat([ids[:, 1:], torch.randint(0, 50, (1, 1), generator=g)], dim=1)
    batch = {"input_ids": ids, "labels": labels, "loss_mask": LOSS_MASK, "document_ids": DOCS,
             "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])}
    with torch.no_grad():
        logits = model(ids).logits
    loss = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    scorer = get_online_scorer("sstoken", {"rho": 0.5, "gamma": 0.0})
    out = scorer(loss, logits, WEIGHTS, batch, model)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():  # each document alone: its attention is the block of a document-masked forward
        a0 = eager(ids[:, :5], output_attentions=True).attentions[-1][0].mean(0)
        a1 = eager(ids[:, 5:], output_attentions=True, position_ids=torch.arange(5)[None]).attentions[-1][0].mean(0)
    score0 = torch.stack([a0[t + 1, :2].sum() for t in (1, 2, 3)])  # rows 2-4, prompt inputs 0-1
    score1 = torch.stack([a1[min(t + 1, 9) - 5, :3].sum() for t in (7, 8, 9)])  # rows 8, 9, 9; prompt 5-7
    expect = torch.zeros(10)
    expect[1 + torch.topk(score0, 2).indices] = 1  # ceil(0.5 * 3) = 2 of each document's 3 response labels
    expect[7 + torch.topk(score1, 2).indices] = 1
    assert out[0].tolist() == expect.tolist()
    assert scorer.stats()["sstoken/kept_fraction"] == pytest.approx(4 / 6)


def test_history_is_the_weights_before_the_first_update_even_with_a_warm_up():
    """The bug: with rel_warmup_steps > 0 the history was copied after the warm-up, not from the start."""
    model = _tiny_llama()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    scorer = get_online_scorer("sstoken", {"gamma": 0.5, "rel_warmup_steps": 2})
    ids = torch.randint(0, 50, (1, 10))
    batch = {"input_ids": ids, "labels": ids, "loss_mask": LOSS_MASK, "document_ids": DOCS}
    for _ in range(3):  # two warm-up steps, then one with the loss-reduction term
        scorer(torch.rand(1, 10), None, WEIGHTS, batch, model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)  # an optimizer update
        scorer.on_step_end(model)
    for k, v in scorer.history.state_dict().items():
        torch.testing.assert_close(v, start[k])


def test_ema_history_update_state_round_trip_and_bad_params():
    model = _tiny_llama()
    scorer = get_online_scorer("sstoken", {"gamma": 1.0, "history": "ema", "ema_decay": 0.75})
    ids = torch.randint(0, 50, (1, 6))
    w = torch.ones(1, 6)
    scorer(torch.rand(1, 6), None, w, {"input_ids": ids, "labels": ids}, model)
    before = [p.detach().clone() for p in scorer.history.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    scorer.on_step_end(model)
    for h, b, p in zip(scorer.history.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(h, 0.75 * b + 0.25 * p)
    resumed = get_online_scorer("sstoken", {"gamma": 1.0, "history": "ema", "ema_decay": 0.75})
    resumed.load_state_dict(scorer.state_dict())  # restored lazily: the history is built at the first call
    resumed(torch.rand(1, 6), None, w, {"input_ids": ids, "labels": ids}, model)
    assert resumed.steps == 1
    for h, r in zip(scorer.history.parameters(), resumed.history.parameters(), strict=True):
        assert torch.equal(h, r)
    with pytest.raises(ValueError, match="rho"):
        get_online_scorer("sstoken", {"rho": 0.0})
