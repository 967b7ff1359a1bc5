"""Bookkeeping of the vote-k ICL ablation (bench/ablate_votek.py): the cached-prefix label scores against full
forward passes, accuracy and topic coverage, the baselines' picks, the verdict of a deterministic arm, and
the section's table. No real model is loaded."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from bench.ablate_votek import (
    against,
    kmeans_demos,
    label_logprobs,
    outcome,
    random_demos,
    read_docs,
    section,
)


@pytest.mark.parametrize("prefix", [[5, 9, 2, 7], []])
def test_label_logprobs_equal_one_forward_pass_per_prompt(prefix):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    suffixes = [[3, 4, 8], [11], [12, 13, 14, 15, 16], [1, 2]]
    labels = [6, 17, 30]
    got = label_logprobs(model, prefix, suffixes, labels, rows=2)
    with torch.no_grad():
        want = [model(input_ids=torch.tensor([prefix + s])).logits[0, -1].log_softmax(-1)[labels].numpy() for s in suffixes]
    np.testing.assert_allclose(got, np.array(want), atol=1e-5)


def test_outcome_counts_argmax_hits_and_topics():
    lp = np.log(np.array([[0.5, 0.2, 0.1, 0.1, 0.1], [0.1, 0.1, 0.6, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1, 0.6]]))
    assert outcome(lp, [0, 2, 3], [1, 1, 4]) == {"accuracy": 2 / 3, "coverage": 2}


def test_baseline_picks_are_distinct_and_seeded():
    assert random_demos(50, 10, 3) == random_demos(50, 10, 3)
    assert len(set(random_demos(50, 10, 3))) == 10
    rng = np.random.default_rng(0)
    x = np.concatenate([c + 0.01 * rng.normal(size=(20, 4)) for c in np.eye(4)[:3] * 10])
    picks = kmeans_demos(x, 3, seed=1)
    assert sorted(p // 20 for p in picks) == [0, 1, 2]


def test_a_deterministic_arm_is_judged_against_the_baselines_spread():
    base = [0.4, 0.5, 0.45, 0.5, 0.55]  # mean 0.48, std 0.0570; z = d / (std * sqrt(1.2))
    assert against([0.6], base) == "no clear difference (+0.120, z = +1.9)"
    assert against([0.7], base) == "better (+0.220, z = +3.5)"
    assert against([0.3], base) == "worse (-0.180, z = -2.9)"
    assert against([0.5], [0.4]) == "+0.100 (baseline has no spread)"


def test_test_set_is_balanced_and_cut():
    ids, texts, labels = read_docs(True, 25, per_topic=True)
    assert Counter(labels) == {j: 5 for j in range(5)} and len(set(ids)) == 25
    assert max(len(t.split()) for t in texts) == 60


def test_section_tables_every_arm_with_its_verdicts():
    run = lambda a, c: {"accuracy": a, "coverage": c}  # noqa: E731
    data = {"setting": {"pool": 300, "test": 100, "per_topic": 20, "words": 60, "graph_k": 15, "rho": 10,
                        "seeds": [0, 1], "ks": [5], "phase1": {"5": 1}},
            "zero_shot": run(0.52, 0), "seconds": 90,
            "k": {"5": {"votek": [run(0.6, 4)], "two_phase": [run(0.5, 3)],
                        "random": [run(0.4, 3), run(0.5, 4)], "kmeans": [run(0.45, 5), run(0.55, 5)]}}}
    lines = section(data)
    assert "0-shot accuracy: 0.520" in lines[0] and "1 (k = 5)" in lines[0]
    assert lines[-4] == ("| vote-k | 1 | 0.600 (one run) | 4.0 (one run) | no clear difference (+0.150, z = +1.7) "
                         "| no clear difference (+0.100, z = +1.2) |")
    assert lines[-2].startswith("| random | 2 | 0.450 ± 0.071 | 3.5 ± 0.7 | — | no clear difference (-0.050")
