import dataclasses
from dataclasses import dataclass, field

import pytest
from omegaconf import MISSING

from tokensift.cli import main as cli_main
from tokensift.config import (
    ConfigError,
    OutputConfig,
    RayConfig,
    RunConfig,
    SourceConfig,
    _check_value,
    load,
    validate_params,
)
from tokensift.pipeline.registry import BUILTIN, get, resolve

TOP_P_15 = "stages=[{stage: tokenize}, {stage: score_threshold, column: n_tokens, top_p: 1.5}]"


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


@dataclass
class _Params:
    """A stage-like params dataclass using every kind of field metadata and a cross-field rule."""

    mode: str = field(default="a", metadata={"choices": ("a", "b")})
    share: float = field(default=0.5, metadata={"gt": 0, "le": 1})
    count: int | None = field(default=None, metadata={"ge": 1, "lt": 10})
    sizes: list[int] = field(default_factory=lambda: [1, 2], metadata={"ge": 1})
    low: float = 0.0
    high: float = 1.0

    def check(self) -> None:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")


@pytest.mark.parametrize(("values", "message"), [
    ({"mode": "c"}, "s.mode: 'c' is not one of a, b"),
    ({"share": 0.0}, "s.share: 0.0 is not > 0"),
    ({"share": 1.5}, "s.share: 1.5 is not <= 1"),
    ({"count": 0}, "s.count: 0 is not >= 1"),
    ({"count": 10}, "s.count: 10 is not < 10"),
    ({"sizes": [3, 0]}, r"s.sizes\[1\]: 0 is not >= 1"),
    ({"low": 2.0}, r"s: low \(2.0\) must be below high \(1.0\)"),
])
def test_field_metadata_and_check_hook_name_the_key(values, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        validate_params(_Params, values, "s")


def test_valid_values_pass_and_none_means_unset():
    p = validate_params(_Params, {"mode": "b", "share": 1.0, "count": 9, "sizes": [1], "low": -1.0}, "s")
    assert (p.mode, p.share, p.count, list(p.sizes)) == ("b", 1.0, 9, [1])
    assert validate_params(_Params, {}, "s").count is None


def test_every_declared_default_satisfies_its_own_metadata():
    """The metadata of the top-level configs and of every built-in stage's params admits its defaults."""
    schemas = [SourceConfig, OutputConfig, RayConfig] + [get(name).params for name in sorted(BUILTIN)]
    checked = 0
    for schema in schemas:
        for f in dataclasses.fields(schema):
            if f.metadata and f.default is not dataclasses.MISSING:
                _check_value(f"{schema.__name__}.{f.name}", f.default, f.metadata)
                checked += 1
    assert checked >= 20


@pytest.mark.parametrize(("override", "message"), [
    ("source.on_invalid=skpi", "source.on_invalid: 'skpi' is not one of error, skip"),
    ("source.fingerprint=md5", "source.fingerprint: 'md5' is not one of stat, sha256"),
    ("source.format=csv", "source.format: 'csv' is not one of auto, parquet, jsonl, hf"),
    ("output.part_compression=gzip", "output.part_compression: 'gzip' is not one of none, zstd, lz4, snappy"),
    ("output.rows_per_shard=0", "output.rows_per_shard: 0 is not > 0"),
    ("ray.num_cpus=0", "ray.num_cpus: 0 is not > 0"),
    (TOP_P_15, r"stages\[1\] \(score_threshold\).top_p: 1.5 is not <= 1"),
    ("stages.1.budget=0", r"stages\[1\] \(sift\).budget: 0 is not >= 1"),
    ("stages.3.alpha=bad", r"stages\[3\] \(eslm\): Value 'bad' of type 'str' could not be converted to Float \(key: alpha\)"),
])
def test_load_rejects_out_of_range_and_unknown_values_naming_file_and_key(override, message):
    with pytest.raises(ConfigError, match=f"^examples/quickstart.yaml: {message}$"):
        load(RunConfig, "examples/quickstart.yaml", [override])


@pytest.mark.parametrize(("stage", "message"), [
    ({"stage": "votek", "budget": 0}, r"stages\[0\] \(votek\).budget: 0 is not >= 1"),
    ({"stage": "votek", "index": "annoy"}, r"stages\[0\] \(votek\).index: 'annoy' is not one of flat, ivf, hnsw"),
    ({"stage": "sift", "query_column": "domain"}, r"stages\[0\] \(sift\): query_column 'domain' needs query_value"),
    ({"stage": "sift", "queries_file": "q.txt", "query_column": "d", "query_value": "m"},
     r"stages\[0\] \(sift\): set exactly one of queries_file or query_column"),
    ({"stage": "sift", "queries_file": "q.txt", "lam": 0}, r"stages\[0\] \(sift\).lam: 0.0 is not > 0"),
    ({"stage": "icon", "top_p": 1.0}, r"stages\[0\] \(icon\).top_p: 1.0 is not < 1"),
    ({"stage": "icon", "test_share": -0.1}, r"stages\[0\] \(icon\).test_share: -0.1 is not >= 0"),
    ({"stage": "embed", "batch_size": 0}, r"stages\[0\] \(embed\).batch_size: 0 is not >= 1"),
])
def test_stage_params_ranges_choices_and_cross_field_rules(stage, message):
    with pytest.raises(ConfigError, match=message):
        resolve([stage])


def test_required_stage_param_is_named():
    @dataclass
    class Needs:
        column: str = MISSING

    with pytest.raises(ConfigError, match=r"stages\[2\] \(x\): required key\(s\) not set: column"):
        validate_params(Needs, {}, "stages[2] (x)")


def test_dry_run_fails_on_a_bad_value_before_any_work(tmp_path, capsys):
    for override in (TOP_P_15, "source.on_invalid=skpi"):
        assert cli_main(["run", "examples/quickstart.yaml", "--dry-run", override]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tokensift run: config error: examples/quickstart.yaml: ") and err.count("\n") == 1
