"""The embed stage: mean pooling of the shipped MiniLM, checked against a direct per-text computation."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from tokensift.models.embed import Embed, EmbedParams
from tokensift.pipeline import registry

TEXTS = [
    "The cat sat on the mat.",
    "A cat was sitting on the rug.",
    "Quarterly profits rose sharply as the company expanded into new markets overseas, analysts said.",
    "Stocks",
]


@pytest.fixture(scope="module")
def stage():
    return Embed(EmbedParams(batch_size=3))


def test_matches_unpadded_mean_pooling(stage):
    """Batched + padded + length-sorted output equals mean pooling of each text encoded alone."""
    out = stage(pa.table({"id": ["a", "b", "c", "d"], "text": TEXTS}))
    assert out.column("embedding").type == pa.list_(pa.float32(), 384)
    got = np.stack(out.column("embedding").to_numpy(zero_copy_only=False))
    tok, model = stage.encoder.tokenizer, stage.encoder.model
    for text, vec in zip(TEXTS, got, strict=True):
        with torch.no_grad():
            h = model(**tok(text, return_tensors="pt")).last_hidden_state[0]
        ref = h.mean(0) / h.mean(0).norm()
        np.testing.assert_allclose(vec, ref.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = got @ got.T
    assert cos[0, 1] > 0.6  # paraphrase
    assert cos[0, 2] < 0.2  # unrelated


def test_registered_and_rejects_null_text(stage):
    spec = registry.get("embed")
    assert spec.kind == "map" and spec.cls is Embed
    assert spec.adds(EmbedParams()) == ["embedding"] and spec.needs(EmbedParams()) == ["text"]
    empty = stage(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}))
    assert empty.num_rows == 0 and empty.column("embedding").type == pa.list_(pa.float32(), 384)
    with pytest.raises(ValueError, match="'text' is null in row 1"):
        stage(pa.table({"id": ["a", "b"], "text": ["x", None]}))
