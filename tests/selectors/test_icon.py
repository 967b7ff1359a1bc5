"""ICon / RICo: formulas on hand-computed cases, labels and classifier selection, the shipped LM, a snapshot."""

from __future__ import annotations

import json
import math
import string

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tokensift.config import RunConfig, load
from tokensift.selectors.fasttext_text import FastTextParams, FastTextScorer
from tokensift.selectors.icon import (
    ICon,
    IConParams,
    contribution,
    influence,
    score_candidate,
    significance,
    squash,
)
from tokensift.selectors.icon_classifier import (
    IConClassify,
    IConClassifyParams,
    auc,
    candidate_texts,
    keep_count,
    significance_labels,
    train_icon_classifier,
)
from tokensift.selectors.icon_scorer import TEMPLATE, IConScorer, candidate_text, random_control
from tokensift.selectors.icon_stage import AssessmentParams, in_subset, load_assessment

SMALL_FT = FastTextParams(epoch=25, lr=0.5, dim=16, bucket=10_000)


# ---------------------------------------------------------------- formulas


def test_influence_hand_computed():
    got = influence([2.0, 4.0, 5.0], [3.0, 4.0, 4.0], [1.0, 2.0, 10.0])
    np.testing.assert_allclose(got, [1 / (1 + 1e-6), 0.0, -1 / (10 + 1e-6)], rtol=1e-12)


def test_influence_rejects_bad_tables():
    with pytest.raises(ValueError, match="lengths differ"):
        influence([1.0, 2.0], [1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="ppl_without must hold finite positive"):
        influence([1.0], [1.0], [0.0])
    with pytest.raises(ValueError, match="ppl_with_random must hold finite positive"):
        influence([1.0], [float("nan")], [1.0])


def test_significance_is_tanh_25x_clipped_beyond_half():
    # 2 / (1 + e^(-50u)) - 1 == tanh(25 u)
    assert significance([0.01, 0.01]) == pytest.approx(math.tanh(0.25), rel=1e-12)
    assert significance([0.03, -0.01]) == pytest.approx(math.tanh(0.25), rel=1e-12)
    assert significance([-0.02]) == pytest.approx(-math.tanh(0.5), rel=1e-12)
    assert significance([0.0]) == 0.0
    assert squash(0.5) == pytest.approx(math.tanh(12.5)) and squash(0.5) < 1.0
    assert significance([0.6, 0.5]) == 1.0 and significance([-0.9]) == -1.0


def test_contribution_statistics_hand_computed():
    stats = contribution([0.2, -0.1, 0.7, 0.0])
    assert stats["significance"] == pytest.approx(math.tanh(25 * 0.2))
    assert stats["consistency"] == 0.5  # 0.2 and 0.7 are > 0; 0.0 is not
    assert stats["coverage"] == 0.25  # only 0.7 > 0.5
    mean = 0.2
    assert stats["stability"] == pytest.approx(sum((v - mean) ** 2 for v in (0.2, -0.1, 0.7, 0.0)) / 3)
    assert stats["n"] == 4
    assert math.isnan(contribution([0.3])["stability"])  # pandas var of one value


def test_aggregation_matches_a_pair_table_grouped_by_candidate():
    """The reference joins three PPL tables pair by pair and groups by candidate: same numbers here."""
    rng = np.random.default_rng(3)
    m, n = 5, 7
    ctx, rand, base = rng.uniform(2, 12, (m, n)), rng.uniform(2, 12, (m, n)), rng.uniform(2, 12, n)
    for c in range(m):
        pair = [(rand[c, s] - ctx[c, s]) / (base[s] + 1e-6) for s in range(n)]
        mean = sum(pair) / n
        expected = 1.0 if mean > 0.5 else -1.0 if mean < -0.5 else 2 / (1 + math.exp(-50 * mean)) - 1
        assert significance(influence(ctx[c], rand[c], base)) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- controls, subset, assessment


def test_random_control_has_the_length_and_alphabet_and_is_seeded():
    a = random_control(300, "0:doc-1")
    assert len(a) == 300 and set(a) <= set(string.ascii_letters + string.punctuation + string.digits + " ")
    assert a == random_control(300, "0:doc-1") and a != random_control(300, "0:doc-2")
    assert candidate_text("Add 1 and 1.", "2", "ignored") == TEMPLATE.format(prompt="Add 1 and 1.") + "2"
    assert candidate_text(None, None, "plain doc") == "plain doc"


def test_subset_is_seeded_and_independent_of_order():
    ids = [f"doc/{i}" for i in range(4000)]
    chosen = in_subset(ids, 0.1, seed=0)
    assert 300 < chosen.sum() < 500
    assert (in_subset(ids[::-1], 0.1, seed=0)[::-1] == chosen).all()
    assert (in_subset(ids, 0.1, seed=1) != chosen).any()


def test_assessment_cap_and_errors(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt": [f"q{i}" for i in range(10)], "response": [f"r{i}" for i in range(10)]}), path)
    pairs = load_assessment(AssessmentParams(paths=[str(path)], max_samples=4, seed=1))
    assert len(pairs) == 4 and pairs == load_assessment(AssessmentParams(paths=[str(path)], max_samples=4, seed=1))
    assert all(x == TEMPLATE.format(prompt="q" + y[1:]) for x, y in pairs)
    with pytest.raises(ValueError, match="assessment.paths is empty"):
        load_assessment(AssessmentParams())
    pq.write_table(pa.table({"prompt": ["q", None], "response": ["r", "s"]}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"b\.parquet: row 1: assessment prompt or response is null"):
        load_assessment(AssessmentParams(paths=[str(tmp_path / "b.parquet")]))
    with pytest.raises(ValueError, match="no column 'answer'"):
        load_assessment(AssessmentParams(paths=[str(path)], response_column="answer"))


# ---------------------------------------------------------------- labels, classifier, selection


def test_labels_use_the_reference_quantile_rule():
    sig = np.linspace(0.1, 1.0, 10)
    labels, threshold = significance_labels(sig, 0.15)
    assert threshold == pytest.approx(0.1 + 0.85 * 0.9)  # linear interpolation, as pandas.quantile
    assert labels.tolist() == [0] * 8 + [1, 1]
    tied, t = significance_labels(np.array([1.0, 1.0, 1.0, 0.0]), 0.15)
    assert t == 1.0 and tied.tolist() == [1, 1, 1, 0]  # ties at the threshold are all positive
    assert keep_count(0.15, 52001) == 7800 and keep_count(0.15, 3) == 1 and keep_count(0.15, 0) == 0
    assert auc(np.array([0.9, 0.8, 0.1, 0.8]), np.array([1, 1, 0, 0])) == pytest.approx(0.875)


def _pool(n=40):
    """Rows i % 4 == 0 speak one vocabulary and have high significance; rows >= 30 are unscored."""
    rng = np.random.default_rng(0)
    good = np.arange(n) % 4 == 0
    words_good, words_bad = "proof lemma theorem derive", "buy cheap offer click"
    texts = [
        " ".join(rng.permutation((words_good if g else words_bad).split()).tolist() + [f"w{i}"])
        for i, g in enumerate(good)
    ]
    sig = np.where(good, 0.9, rng.uniform(-0.5, 0.3, n))
    sig[30:] = np.nan
    return pa.table(
        {
            "id": [f"d{i:02d}" for i in range(n)],
            "text": texts,
            "icon_significance": pa.array(sig, pa.float32(), from_pandas=True),
        }
    ), good


def test_icon_select_labels_trains_scores_and_keeps_top_p(tmp_path):
    table, good = _pool()
    clf = tmp_path / "clf.bin"
    params = IConParams(top_p=0.25, prompt_column=None, response_column=None, classifier=SMALL_FT, classifier_path=str(clf))
    sel = ICon(params).select(table)
    assert sel.stats["scored"] == 30 and sel.stats["positives"] == 8  # the 8 scored good rows
    sig = np.sort(table.column("icon_significance").to_numpy(zero_copy_only=False)[:30].astype(np.float64))
    # the 0.75 quantile sits at sorted position 21.75: between the best other row and the good rows
    assert sel.stats["significance_threshold"] == pytest.approx(sig[21] + 0.75 * (sig[22] - sig[21]))
    assert sel.stats["train_rows"] == 27 and sel.stats["test_rows"] == 3
    assert len(sel.ids) == 10  # floor(0.25 * 40) of the whole pool, unscored rows included
    assert set(sel.ids) == {f"d{i:02d}" for i in np.flatnonzero(good)}
    assert sel.scores == sorted(sel.scores, reverse=True)
    assert clf.is_file()


def test_icon_classify_stage_scores_like_fasttext(tmp_path):
    table, _ = _pool()
    texts = table.column("text").to_pylist()
    labels = np.array([1 if "proof" in t else 0 for t in texts])
    stats = train_icon_classifier(texts, labels, tmp_path / "m.bin", SMALL_FT, test_share=0.25)
    assert stats["test_rows"] == 10 and stats["test_auc"] == 1.0
    batch = pa.table({"id": ["a", "b"], "text": ["x", "y"], "prompt": ["Prove it.", None], "response": ["lemma", None]})
    out = IConClassify(IConClassifyParams(classifier=str(tmp_path / "m.bin")))(batch)
    expected = FastTextScorer(tmp_path / "m.bin").proba([TEMPLATE.format(prompt="Prove it.") + "lemma", "y"])
    np.testing.assert_array_equal(out.column("icon_classify_score").to_numpy(), expected)
    assert candidate_texts(batch, "prompt", "response", "text", TEMPLATE)[1] == "y"
    with pytest.raises(ValueError, match="all have label 0"):
        train_icon_classifier(texts[:3], np.zeros(3, int), tmp_path / "z.bin", SMALL_FT)


# ---------------------------------------------------------------- scorer mechanics on a tiny random LM


class _BosTokenizer:
    """SmolLM2's tokenizer, but adding a BOS (id 1) like LLaMA's when special tokens are requested."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text, add_special_tokens=True):
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


@pytest.fixture(scope="module")
def tiny_lm(smollm2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = smollm2[1]
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg).eval(), tok


def _manual_ppl(model, prefix_ids, x_ids, y_ids):
    """exp(mean NLL of y) from one plain forward pass of prefix + x + y (independent of the scorer)."""
    import torch
    import torch.nn.functional as F

    ids = prefix_ids + x_ids + y_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    return math.exp(nll[-len(y_ids):].double().mean().item())


@pytest.mark.parametrize("bos", [False, True])
def test_scorer_perplexities_match_plain_forward_passes(tiny_lm, bos):
    model, tok = tiny_lm
    tok = _BosTokenizer(tok) if bos else tok
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    assessment = [("### Instruction:\nAdd 2 and 3.\n\n### Response:", "2 + 3 = 5"), ("Q: sky colour?", "It is blue.")]
    cand = "### Instruction:\nAdd 1 and 1.\n\n### Response:1 + 1 = 2"
    start = [1] if bos else []
    for control in ("per_candidate", "per_pair", "none"):
        scorer = IConScorer(model, tok, assessment, batch_size=2, control=control, seed=7)
        got = scorer.perplexities(cand, "c1")
        for j, (x, y) in enumerate(assessment):
            base = _manual_ppl(model, start, enc(x), enc(y)) if bos else _manual_ppl(model, [], enc(x), enc(y))
            ctx = _manual_ppl(model, start + enc(cand) + enc("\n\n\n"), enc(x), enc(y))
            key = {"per_candidate": "7:c1", "per_pair": f"7:c1:{j}"}.get(control)
            rand = base if key is None else _manual_ppl(
                model, start + enc(random_control(len(cand), key)) + enc("\n\n\n"), enc(x), enc(y)
            )
            assert got["ppl_without"][j] == pytest.approx(base, rel=1e-4)
            assert got["ppl_with_context"][j] == pytest.approx(ctx, rel=1e-4)
            assert got["ppl_with_random"][j] == pytest.approx(rand, rel=1e-4)
    cached = IConScorer(model, tok, assessment, batch_size=2).perplexities(cand, "c1")
    naive = IConScorer(model, tok, assessment, batch_size=1, kv_reuse=False).perplexities(cand, "c1")
    assert cached["forward_passes"] == 2 * (1 + 1) and naive["forward_passes"] == 2 * 2  # one per pair
    assert naive["tokens_computed"] > cached["tokens_computed"]  # the context is not re-run per sample
    np.testing.assert_allclose(naive["ppl_with_context"], cached["ppl_with_context"], rtol=1e-4)
    np.testing.assert_allclose(naive["ppl_with_random"], cached["ppl_with_random"], rtol=1e-4)


# ---------------------------------------------------------------- the shipped LM on real data


@pytest.fixture(scope="module")
def gsm8k(sample_dir):
    """Six real GSM8K rows of the sample corpus (prompt / response), the shortest first."""
    rows = pq.read_table(sample_dir / "math.parquet", columns=["id", "text", "prompt", "response"]).slice(0, 40).to_pylist()
    return sorted(rows, key=lambda r: len(r["text"]))[:6]


def test_format_teaching_candidate_beats_random_characters(smollm2, gsm8k):
    model, tok = smollm2
    assessment = [(TEMPLATE.format(prompt=r["prompt"]), r["response"]) for r in gsm8k[:3]]
    scorer = IConScorer(model, tok, assessment, batch_size=4)
    teach = candidate_text(gsm8k[3]["prompt"], gsm8k[3]["response"], gsm8k[3]["text"])
    noise = random_control(len(teach), "noise-candidate")
    good, bad = score_candidate(scorer, teach, gsm8k[3]["id"]), score_candidate(scorer, noise, "noise")
    assert good["significance"] > bad["significance"]
    assert good["significance"] > 0.5 and good["consistency"] == 1.0  # a worked "#### n" answer helps every sample
    assert abs(bad["mean_influence"]) < abs(good["mean_influence"])
    assert good["forward_passes"] == 2 * (1 + 1)  # two contexts, each: prefix once + one batch of 3 samples



@pytest.mark.slow
def test_config_path_writes_a_snapshot(ray_local, gsm8k, tmp_path):
    from tokensift.pipeline import runner

    pq.write_table(pa.Table.from_pylist(gsm8k[:2]), tmp_path / "assessment.parquet")
    pq.write_table(pa.Table.from_pylist(gsm8k[2:]), tmp_path / "pool.parquet")
    cfg = {
        "source": {"paths": [str(tmp_path / "pool.parquet")]},
        "output": {"path": str(tmp_path / "snap"), "report": False},
        "stages": [
            {
                "stage": "icon_score",
                "assessment": {"paths": [str(tmp_path / "assessment.parquet")]},
                "max_context_tokens": 96,
                "max_segment_tokens": 64,
                "batch_size": 2,
                "resources": {"num_cpus": 0.5, "concurrency": 1, "batch_size": 8},
            },
            {"stage": "icon", "top_p": 0.5, "test_share": 0.0, "classifier": {"dim": 16, "bucket": 10000}},
        ],
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = runner.run(load(RunConfig, tmp_path / "c.yaml"))
    manifest = json.loads((out / "manifest.json").read_text())
    icon = [s for s in manifest["stages"] if s["name"] == "icon"][0]
    assert icon["stats"]["scored"] == 4 and icon["stats"]["kept_docs"] == 2
    data = pa.concat_tables([pq.read_table(p) for p in sorted((out / "data").glob("*.parquet"))])
    assert data.num_rows == 2 and set(data.column("id").to_pylist()) <= {r["id"] for r in gsm8k[2:]}
    assert pa.compute.min(data.column("icon_forward_passes")).as_py() == 4
