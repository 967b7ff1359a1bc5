"""Document-aware packing: a packed batch gives each document exactly what it gets alone (built-in GPT and an
HF Llama), and the GPT's ``output_attentions`` returns the last layer's attention probabilities."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tokensift.models.gpt import GPT
from tokensift.models.gpt_config import GPTConfig, MoDConfig, MoEConfig
from tokensift.models.packing import document_mask, flattened_forward
from tokensift.pipeline.loader import TokenLoader
from tokensift.pipeline.shards import write_manifest
from tokensift.trainers.losses import token_cross_entropy
from tokensift.trainers.step import forward_logits, micro_batch_loss

pytestmark = pytest.mark.usefixtures("one_thread")
V, L = 64, 24
GPT_BASE = dict(vocab_size=V, block_size=L, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict:
    """Two packed rows of 24 tokens from 8 documents of random ids (the loader's own batch)."""
    root = tmp_path_factory.mktemp("snap")
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, V, n).tolist() for n in (5, 9, 3, 12, 7, 4, 8, 6)]
    (root / "data").mkdir()
    pq.write_table(pa.table({"input_ids": pa.array(docs, pa.list_(pa.int32()))}), root / "data" / "train-00000-of-00001.parquet")
    write_manifest(root)
    batch = next(iter(TokenLoader(root, L, 2, shuffle=False, lanes=1)))
    assert int(batch["document_ids"].max()) >= 3  # several documents in a row
    return batch


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    variant = {"gpt": {}, "gpt_moe": {"moe": MoEConfig(num_experts=4, capacity_factor=None)},
               "gpt_mod_eval": {"mod": MoDConfig(capacity=0.5)}}[name]
    return GPT(GPTConfig(**GPT_BASE, **variant))


@pytest.mark.parametrize("name", ["gpt", "gpt_moe", "gpt_mod_eval", "llama"])
def test_a_packed_batch_equals_its_documents_run_one_by_one(packed, name):
    model = _model(name).float()
    model.train(name != "gpt_mod_eval")  # MoD's training top-k looks at the whole row; its eval routing is causal
    logits = forward_logits(model, model, packed)
    alone = torch.zeros_like(logits)
    for b in range(packed["input_ids"].shape[0]):
        for d in packed["document_ids"][b].unique():
            span = packed["document_ids"][b] == d
            alone[b, span] = forward_logits(model, model, {"input_ids": packed["input_ids"][b, span][None]})[0]
    torch.testing.assert_close(logits, alone, rtol=0, atol=1e-5)
    loss, token_loss, _ = micro_batch_loss(model, model, packed)
    ce = token_cross_entropy(alone, packed["labels"])
    w = packed["loss_weights"]
    torch.testing.assert_close(loss, (ce * w).sum() / w.sum(), rtol=0, atol=1e-5)
    torch.testing.assert_close(token_loss[w > 0], ce[w > 0], rtol=0, atol=1e-5)
    # without the document ids the later documents see the earlier ones: the check above can fail
    unpacked = forward_logits(model, model, {"input_ids": packed["input_ids"]})
    assert (unpacked - alone).abs().max() > 1e-3


def test_flattened_rows_keep_documents_apart_without_a_mask(packed):
    """The flash-attention path (one flattened row, documents from position_ids), run here on SDPA."""
    model = _model("llama").float().eval()
    logits = flattened_forward(model, packed["input_ids"], packed["position_ids"]).logits
    torch.testing.assert_close(logits, forward_logits(model, model, packed), rtol=0, atol=1e-5)


def test_gpt_output_attentions_are_the_last_layers_probabilities(packed):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**GPT_BASE)).eval()
    ids, pos, doc = packed["input_ids"], packed["position_ids"], packed["document_ids"]
    seen = {}
    model.h[-1].ln_1.register_forward_hook(lambda m, i, o: seen.update(x=o))
    logits, probs = model(ids, position_ids=pos, document_ids=doc, output_attentions=True)
    torch.testing.assert_close(logits, model(ids, position_ids=pos, document_ids=doc), rtol=0, atol=1e-5)
    attn, (B, T), H = model.h[-1].attn, ids.shape, model.config.n_head
    q, k, _ = (t.view(B, T, H, -1).transpose(1, 2) for t in attn.c_attn(seen["x"]).split(GPT_BASE["n_embd"], 2))
    scores = (q @ k.transpose(-2, -1) / (k.shape[-1] ** 0.5)).masked_fill(~document_mask(doc)[:, None], float("-inf"))
    torch.testing.assert_close(probs, scores.softmax(-1), rtol=0, atol=1e-6)
    assert probs.shape == (B, H, T, T) and (probs[~document_mask(doc)[:, None].expand_as(probs)] == 0).all()
    _, plain = model(ids, output_attentions=True)  # unpacked: causal over the whole row
    assert (plain.sum(-1) - 1).abs().max() < 1e-5 and plain[..., -1, 0].min() > 0


def test_gpt_output_attentions_of_a_routed_last_block_cover_only_routed_tokens(packed):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**GPT_BASE, mod=MoDConfig(capacity=0.5))).train()
    _, probs = model(packed["input_ids"], document_ids=packed["document_ids"], output_attentions=True)
    routed = model.h[-1].last["routed"]
    rows = probs.sum(-1)
    assert torch.allclose(rows[routed[:, None].expand_as(rows)], torch.ones(()), atol=1e-5)
    assert (rows[~routed[:, None].expand_as(rows)] == 0).all() and (probs.sum(-2)[~routed[:, None].expand_as(rows)] == 0).all()
