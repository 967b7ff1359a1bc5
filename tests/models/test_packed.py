"""Prepacked oneDNN linear layers: the same products as ``nn.Linear``, repacked after a weight update, only in
fp32 CPU inference, and every layer's own forward back on exit."""

from __future__ import annotations

import pytest
import torch

from tokensift.models.packed import packed_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32, bias=False))


def test_packed_layers_compute_what_linear_computes_and_are_restored():
    model, x = _mlp(), torch.randn(3, 17, 64)
    with torch.inference_mode():
        expected = model(x)
        with packed_linears(model):
            assert all("forward" in m.__dict__ for m in model if isinstance(m, torch.nn.Linear))
            got = model(x)
    assert all("forward" not in m.__dict__ for m in model)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_weight_update_is_repacked_not_served_stale():
    model, x = _mlp(), torch.randn(5, 64)
    with torch.inference_mode(), packed_linears(model):
        before = model(x)
    torch.optim.SGD(model.parameters(), lr=1.0).zero_grad()
    model(x).square().sum().backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    with torch.inference_mode():
        expected = model(x)
        with packed_linears(model):
            after = model(x)
    assert (after - before).abs().max() > 1e-2  # the step moved the outputs
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)


def test_training_and_other_dtypes_keep_plain_linear():
    model = _mlp()
    with packed_linears(model):  # grad enabled: nothing is swapped, gradients flow as usual
        assert all("forward" not in m.__dict__ for m in model)
        model(torch.randn(2, 64)).sum().backward()
    assert model[0].weight.grad is not None
    half = _mlp().to(torch.bfloat16)
    with torch.inference_mode(), packed_linears(half):
        assert all("forward" not in m.__dict__ for m in half)
