"""Submission without a cluster: config resolution, runtime env, entrypoint, address and error handling."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tokensift.cli import build_parser, main
from tokensift.config import ConfigError
from tokensift.jobs import launch
from tokensift.jobs import submit as submit_mod
from tokensift.jobs.client import JobsError, connect, resolve_address
from tokensift.jobs.submit import JOB_CONFIG, LAUNCHER, entrypoint, job_config, runtime_env, submit

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing answers


def test_entrypoint_runs_the_launcher_under_the_chosen_python():
    assert shlex.split(entrypoint()) == ["python", LAUNCHER, JOB_CONFIG]
    assert shlex.split(entrypoint(python="/opt/my env/bin/python")) == ["/opt/my env/bin/python", LAUNCHER, JOB_CONFIG]


def test_launcher_is_a_tokensift_run_on_the_jobs_cluster(monkeypatch):
    import tokensift.cli

    seen = []
    monkeypatch.setattr(tokensift.cli, "main", lambda argv: seen.append(argv) or 0)
    assert launch.main([JOB_CONFIG]) == 0
    args = build_parser().parse_args(seen[0])
    assert (args.command, args.config, args.address) == ("run", JOB_CONFIG, "auto")


@pytest.mark.parametrize(("package_on_path", "missing"), [(True, "omegaconf"), (False, "tokensift")])
def test_launcher_under_a_python_without_tokensift_says_how_to_fix_the_head(tmp_path, package_on_path, missing):
    """What ``.venv/bin/ray start --head`` without the venv activated gives a job: a python whose site-packages
    lack tokensift's dependencies (``-S``), with the shipped package on PYTHONPATH (or, ``--no-package``, not)."""
    script = tmp_path / LAUNCHER
    script.write_text(Path(launch.__file__).read_text())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if package_on_path:
        env["PYTHONPATH"] = str(ROOT)  # Ray puts py_modules there
    done = subprocess.run([sys.executable, "-S", str(script), JOB_CONFIG], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr and "ModuleNotFoundError" not in done.stderr
    assert done.stderr.startswith(f"tokensift job: {sys.executable} (Python ")
    assert f"cannot import {missing!r}" in done.stderr
    assert "source .venv/bin/activate" in done.stderr and "tokensift submit --python" in done.stderr


def test_an_unknown_stage_fails_at_submit_before_anything_is_sent(tmp_path, monkeypatch):
    monkeypatch.setattr(submit_mod, "connect", lambda *a, **k: pytest.fail("connected with an invalid config"))
    bad = tmp_path / "bad_stage.yaml"
    bad.write_text("source: {paths: [x.parquet]}\noutput: {path: o}\nstages: [{stage: no_such_stage}]\n")
    with pytest.raises(ConfigError, match=r"bad_stage.yaml: unknown stage 'no_such_stage'"):
        submit(bad, address=UNREACHABLE)


def test_job_config_makes_local_paths_absolute_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = job_config(QUICKSTART, ["source.paths=[data/*.parquet,s3://bucket/x.parquet]", "output.path=snap"])
    assert list(cfg.source.paths) == [f"{tmp_path}/data/*.parquet", "s3://bucket/x.parquet"]
    assert cfg.output.path == f"{tmp_path}/snap"
    assert cfg.stages[0]["stage"] == "embed"  # the file's content is kept


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
    assert (args.config, args.overrides, args.address, args.follow, args.no_package, args.python) == (
        "c.yaml", ["output.path=/s", "seed=3"], "http://h:8265", True, True, "python")
