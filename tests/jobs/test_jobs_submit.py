"""Submission without a cluster: config resolution, runtime env, entrypoint, address and error handling."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from tokensift.cli import build_parser, main
from tokensift.config import ConfigError
from tokensift.jobs import submit as submit_mod
from tokensift.jobs.client import JobsError, connect, resolve_address
from tokensift.jobs.submit import JOB_CONFIG, entrypoint, job_config, runtime_env, submit

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing answers


def test_entrypoint_is_a_tokensift_run_on_the_jobs_cluster():
    argv = shlex.split(entrypoint())
    assert argv[:3] == ["python", "-m", "tokensift.cli"]
    args = build_parser().parse_args(argv[3:])
    assert (args.command, args.config, args.address) == ("run", JOB_CONFIG, "auto")


def test_job_config_makes_local_paths_absolute_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = job_config(QUICKSTART, ["source.paths=[data/*.parquet,s3://bucket/x.parquet]", "output.path=snap"])
    assert list(cfg.source.paths) == [f"{tmp_path}/data/*.parquet", "s3://bucket/x.parquet"]
    assert cfg.output.path == f"{tmp_path}/snap"
    assert cfg.stages[0]["stage"] == "tokenize"  # the file's content is kept


def test_a_typo_in_an_override_fails_before_anything_is_sent(monkeypatch):
    def no_connect(*a, **k):
        raise AssertionError("connected although the config is invalid")

    monkeypatch.setattr(submit_mod, "connect", no_connect)
    with pytest.raises(ConfigError, match="outptu"):
        submit(QUICKSTART, ["outptu.path=/tmp/x"], address=UNREACHABLE)


def test_runtime_env_ships_the_config_and_the_package(tmp_path):
    env = runtime_env(tmp_path)
    assert env["working_dir"] == str(tmp_path)
    (package,) = env["py_modules"]
    assert (Path(package) / "cli.py").is_file() and Path(package).name == "tokensift"
    assert "__pycache__" in env["excludes"]
    assert "py_modules" not in runtime_env(tmp_path, ship_package=False)


def test_job_config_written_for_the_job_round_trips(tmp_path):
    from tokensift.config import RunConfig, load, to_yaml

    cfg = job_config(QUICKSTART, [f"output.path={tmp_path / 'snap'}"])
    (tmp_path / JOB_CONFIG).write_text(to_yaml(cfg))
    again = load(RunConfig, tmp_path / JOB_CONFIG)
    assert yaml.safe_load(to_yaml(again)) == yaml.safe_load(to_yaml(cfg))


def test_address_comes_from_the_flag_then_the_environment(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(JobsError, match="--address"):
        resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    assert resolve_address(None) == "http://10.0.0.1:8265"
    assert resolve_address("http://h:1") == "http://h:1"


def test_unreachable_cluster_is_one_clear_error():
    with pytest.raises(JobsError, match="127.0.0.1:9"):
        connect(UNREACHABLE)


@pytest.mark.parametrize("argv", [["status", "some-job"], ["logs", "some-job"], ["stop", "some-job"]])
def test_job_commands_report_connection_errors_in_one_line(argv, capsys):
    assert main([*argv, "--address", UNREACHABLE]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tokensift {argv[0]}: cannot use the Ray Jobs API at {UNREACHABLE}")
    assert "\n" not in err and "Traceback" not in err


def test_submit_command_parses_config_overrides_and_options():
    args = build_parser().parse_args(
        ["submit", "c.yaml", "output.path=/s", "seed=3", "--address", "http://h:8265", "--follow", "--no-package"])
    assert (args.config, args.overrides, args.address, args.follow, args.no_package) == (
        "c.yaml", ["output.path=/s", "seed=3"], "http://h:8265", True, True)
