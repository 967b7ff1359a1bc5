"""The built-in GPT family: interface, causality, FLOPs against torch's counter, config errors, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tokensift.models.gpt import GPT
from tokensift.models.gpt_config import GPTConfig, MoDConfig, MoEConfig

BASE = dict(vocab_size=96, block_size=64, n_layer=4, n_head=2, n_embd=32)
VARIANTS = {
    "dense": {},
    "moe": {"moe": MoEConfig(num_experts=4, capacity_factor=None)},
    "mod": {"mod": MoDConfig()},
    "mod_bce": {"mod": MoDConfig(router_aux="bce", capacity=0.25)},
    "mode": {"moe": MoEConfig(num_experts=4, capacity_factor=None, every=2), "mod": MoDConfig()},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**BASE, **VARIANTS[name]))


def test_interface_hidden_logits_tied_head_and_zero_aux_for_dense():
    model = _model("dense")
    x = torch.randint(0, 96, (2, 16))
    hidden = model(x, return_hidden=True)
    assert hidden.shape == (2, 16, 32)
    assert torch.allclose(model.lm_head(hidden), model(x))
    assert model.lm_head.weight is model.wte.weight
    assert model.aux_loss().item() == 0.0 and model.stats() == {}
    model.begin_global_batch()
    model.end_global_batch()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_flops_match_torch_flop_counter(name):
    """``flops_per_token`` equals torch's FLOP counter on a training forward (math SDPA so attention counts)."""
    model = _model(name).train()
    x = torch.randint(0, 96, (2, 64))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    assert counter.get_total_flops() / x.numel() == model.flops_per_token(64)


def test_mod_cuts_forward_flops_about_forty_percent_in_blocks():
    dense, mod = GPT(GPTConfig(**{**BASE, "vocab_size": 1})), GPT(GPTConfig(**{**BASE, "vocab_size": 1}, mod=MoDConfig()))
    saving = 1 - mod.flops_per_token(64) / dense.flops_per_token(64)
    assert 0.38 < saving < 0.45  # half the blocks at 12.5 % (research note section 7.4: about 40 %)


@pytest.mark.parametrize("name", ["dense", "moe", "moe_capacity", "mod", "mod_bce", "mode"])
def test_eval_forward_is_causal(name):
    """In eval (sampling-time routing, dropless MoE) the logits at t never depend on tokens after t."""
    if name == "moe_capacity":
        torch.manual_seed(0)
        model = GPT(GPTConfig(**BASE, moe=MoEConfig(num_experts=4, capacity_factor=0.5))).eval()
    else:
        model = _model(name).eval()
    x = torch.randint(0, 96, (2, 40))
    y = x.clone()
    y[:, 25:] = torch.randint(0, 96, (2, 15))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :25], b[:, :25], atol=1e-5)
    assert not torch.allclose(a[:, 25:], b[:, 25:], atol=1e-3)


def test_aux_loss_sums_layers_and_stats_report_routing():
    model = _model("mode").train()
    model.begin_global_batch()
    model(torch.randint(0, 96, (2, 64)))
    parts = [model.h[i].block.mlp.aux for i in (1, 3)] + [model.h[i].aux for i in (1, 3)]
    assert torch.allclose(model.aux_loss(), torch.stack(parts).sum())
    model.end_global_batch()
    stats = model.stats()
    assert stats["mod/1/routed_share"] == 0.125
    assert sum(stats[f"moe/3/load_{e}"] for e in range(4)) == pytest.approx(1.0)
    assert stats["moe/3/max_over_mean_load"] >= 1.0 and "mod/3/causal_recall" in stats


def test_config_from_omegaconf_and_errors_name_the_key():
    cfg = OmegaConf.merge(OmegaConf.structured(GPTConfig), OmegaConf.from_dotlist(["n_layer=2", "n_embd=32", "n_head=2", "moe.top_k=1"]))
    model = GPT(cfg)
    assert model.config.moe.top_k == 1 and model.config.moe.num_experts == 8 and model.config.mod is None
    with pytest.raises(ValueError, match="n_embd=30 must be divisible by n_head=4"):
        GPT(GPTConfig(n_embd=30, n_head=4))
    with pytest.raises(ValueError, match="moe.balance='sequence'"):
        GPT(GPTConfig(**BASE, moe=MoEConfig(balance="sequence")))
    with pytest.raises(ValueError, match="moe.top_k=9"):
        GPT(GPTConfig(**BASE, moe=MoEConfig(top_k=9)))
    with pytest.raises(ValueError, match="mod.router_aux='sigmoid'"):
        GPT(GPTConfig(**BASE, mod=MoDConfig(router_aux="sigmoid")))
    with pytest.raises(ValueError, match=r"GPTConfig.moe: unknown key\(s\) \['experts'\]"):
        GPT({**BASE, "moe": {"experts": 4}})
    with pytest.raises(ValueError, match="more than block_size=64"):
        _model("dense")(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("name", ["dense", "moe", "mod"])
def test_learns_a_repeated_pattern(name):
    model = _model(name).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = (torch.arange(65) * 7 % 96).repeat(4, 1)
    losses = []
    for _ in range(30):
        model.begin_global_batch()
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 96), x[:, 1:].reshape(-1))
        (loss + model.aux_loss()).backward()
        opt.step()
        opt.zero_grad()
        model.end_global_batch()
        losses.append(loss.item())
    assert losses[-1] < 0.15 * losses[0], losses[::10]
