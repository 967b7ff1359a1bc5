"""Pure bookkeeping of the token-level part: injected errors, critical-token AUROC, FLOPs accounting."""

import random
from types import SimpleNamespace

import numpy as np
import pytest

from bench.ablate_sft import flops_per_token, run_cost
from bench.ablate_tokendata import critical_auroc, first_difference, inject_error
from bench.ablate_tokenlevel import equal_flops_step

GSM = "He has 3 + 4 = <<3+4=7>>7 apples.\nThen 7 * 2 = <<7*2=14>>14.\n#### 14"


def test_inject_error_shifts_one_step_and_the_answer():
    rng = random.Random(0)
    delta = random.Random(0).choice([-3, -2, -1, 1, 2, 3])  # the first draw of the same seed
    out = inject_error(GSM, rng)
    assert out.endswith(f"#### {14 + delta}")
    changed = [s for s in ("<<3+4=7>>7", "<<7*2=14>>14") if s not in out]
    assert len(changed) == 1
    assert inject_error("no answer here", random.Random(0)) is None
    assert inject_error("It is 5.\n#### 1,005", random.Random(1)) in {f"It is 5.\n#### {1005 + d}" for d in (-3, -2, -1, 1, 2, 3)}


def test_first_difference_and_auroc():
    assert first_difference(np.array([1, 2, 3, 4]), np.array([1, 2, 9, 4])) == 2
    assert first_difference(np.array([1, 2]), np.array([1, 2, 3])) == 2
    w = np.array([0.0, 0.0, 0.1, 0.9, 0.1, 0.5])
    assert critical_auroc(w, 2, 3) == 1.0  # the injected token outweighs the other three response tokens
    assert critical_auroc(w, 2, 4) == pytest.approx(0.5 / 3)  # one tie (0.1), two larger


def test_flops_accounting():
    cfg = SimpleNamespace(hidden_size=4, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                          intermediate_size=8, vocab_size=10)
    fwd, bwd = flops_per_token(cfg, 1, 5)
    p_layer = 2 * 16 + 2 * 4 * 2 + 3 * 4 * 8  # q, o; k, v; gate, up, down
    assert fwd == 2 * (3 * p_layer + 40) + 2 * 3 * 5 * 4
    assert bwd == 2 * (2 * p_layer + 2 * 5 * 4) + 2 * 40
    records = [{"tokens": 100, "kept_fraction": 0.5}, {"tokens": 100, "kept_fraction": 0.25}]
    cost = run_cost(records, 100, 2.0, 4.0, extra_forwards=1)
    assert cost == {"steps": 2, "positions": 200, "backprop_tokens": 75.0, "flops": 2 * 2.0 * 200 + 4.0 * 75}
    assert run_cost([{"tokens": 30}], 64, 1.0, 1.0)["backprop_tokens"] == 30.0  # DPO: response tokens
    assert equal_flops_step(250.0, 100.0, 10) == 2
    assert equal_flops_step(2000.0, 100.0, 10) == 10
