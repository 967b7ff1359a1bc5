"""vote-k phase 2's confidence: the mean log-probability of the LM's own greedy output, per document."""

import pyarrow as pa
import pytest
import torch

from tokensift.selectors.votek_confidence import VoteKConfidence, VoteKConfidenceParams

TEXTS = ["The capital of France is", "zq xv jj kw ppl qq zzv mmo bruk"]


@pytest.mark.slow
def test_confidence_is_the_mean_logprob_of_the_greedy_output_teacher_forced(smollm2):
    stage = VoteKConfidence(VoteKConfidenceParams(max_new_tokens=6))
    out = stage(pa.table({"text": TEXTS})).column("votek_confidence").to_pylist()
    model, tok = stage.model, stage.tok
    for text, got in zip(TEXTS, out, strict=True):  # oracle: each text alone, no padding
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            seq = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
            logits = model(seq).logits[0, ids.shape[1] - 1 : -1].float()
        new = seq[0, ids.shape[1]:]
        if tok.eos_token_id in new.tolist():
            cut = new.tolist().index(tok.eos_token_id) + 1
            new, logits = new[:cut], logits[:cut]
        expect = torch.log_softmax(logits, -1).gather(1, new[:, None]).mean().item()
        assert got == pytest.approx(expect, abs=2e-3)
    assert out[0] > out[1]  # a fact it knows vs letter noise
    assert VoteKConfidence.adds(VoteKConfidenceParams()) == ["votek_confidence"]
