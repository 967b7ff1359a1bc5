import pytest

from tokensift.config import ConfigError, RunConfig, load
from tokensift.pipeline.registry import resolve


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_overrides_apply_with_types(tmp_path):
    p = write(tmp_path, "source: {paths: [a.parquet]}\noutput: {path: out}\n")
    cfg = load(RunConfig, p, ["output.rows_per_shard=10", "source.max_doc_chars=5"])
    assert cfg.output.rows_per_shard == 10 and cfg.source.max_doc_chars == 5


def test_unknown_key_is_an_error_naming_it(tmp_path):
    p = write(tmp_path, "source: {paths: [a], textcolumn: x}\noutput: {path: o}\n")
    with pytest.raises(ConfigError, match="textcolumn"):
        load(RunConfig, p)


def test_wrong_type_is_an_error_naming_the_key(tmp_path):
    p = write(tmp_path, "source: {paths: [a]}\noutput: {path: o}\n")
    with pytest.raises(ConfigError, match="rows_per_shard"):
        load(RunConfig, p, ["output.rows_per_shard=many"])


def test_missing_required_and_malformed_override(tmp_path):
    p = write(tmp_path, "output: {path: o}\n")
    with pytest.raises(ConfigError, match="source.paths"):
        load(RunConfig, p)
    p = write(tmp_path, "source: {paths: [a]}\noutput: {path: o}\n")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load(RunConfig, p, ["output.path"])


def test_stage_params_are_validated():
    with pytest.raises(ConfigError, match=r"stages\[0\].*top_q"):
        resolve([{"stage": "score_threshold", "column": "s", "top_q": 0.1}])
    with pytest.raises(ConfigError, match="unknown stage 'nope'"):
        resolve([{"stage": "nope"}])
    with pytest.raises(ConfigError, match="batch_size"):
        resolve([{"stage": "tokenize", "resources": {"batch_size": "big"}}])
    (entry,) = resolve([{"stage": "score_threshold", "column": "s", "top_p": 0.25, "resources": {"concurrency": 3}}])
    assert entry.params.top_p == 0.25 and entry.resources.concurrency == 3


def test_yaml_syntax_error_and_list_index_override(tmp_path):
    p = write(tmp_path, "source: {paths: [a\n")
    with pytest.raises(ConfigError, match="c.yaml"):
        load(RunConfig, p)
    p = write(tmp_path, "source: {paths: [a]}\noutput: {path: o}\nstages: [{stage: tokenize}, {stage: score_threshold}]\n")
    cfg = load(RunConfig, p, ["stages.1.top_p=0.5", "stages.1.column=n_tokens"])
    assert cfg.stages[1].top_p == 0.5 and cfg.stages[1].column == "n_tokens"
