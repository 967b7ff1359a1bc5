"""Submit a selection run to a Ray cluster through the Jobs API.

The config is loaded and overridden here (so typos fail before anything is sent), its local paths are made
absolute, and the resolved YAML travels in the job's ``working_dir``; the ``tokensift`` package travels as
a ``py_modules`` entry, so the cluster runs the submitter's code. The job's entrypoint is
``python tokensift_job.py tokensift_job.yaml`` (:mod:`tokensift.jobs.launch`), which checks that the
cluster's ``python`` can import tokensift's dependencies (else it says how to fix the head) and then runs
``tokensift run tokensift_job.yaml --address auto``: inside a job, ``auto`` is the cluster the job runs on. Paths are read and written by the cluster, so on a multi-node cluster they must be on
shared storage (NFS, a mounted bucket) or be URIs.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import tokensift
from tokensift.config import ConfigError, RunConfig, _first_line, load, to_yaml
from tokensift.jobs.client import connect

JOB_CONFIG = "tokensift_job.yaml"
LAUNCHER = "tokensift_job.py"
PACKAGE_DIR = Path(tokensift.__file__).resolve().parent
EXCLUDES = ["__pycache__", "*.pyc"]
AGENT_WAIT = 60.0  # seconds to retry while a fresh head's job agent comes up


def entrypoint(config_file: str = JOB_CONFIG, python: str = "python") -> str:
    """The shell command a job runs: the launcher (:mod:`tokensift.jobs.launch`) under ``python``."""
    return f"{shlex.quote(python)} {LAUNCHER} {shlex.quote(config_file)}"


def job_config(config: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Load ``config`` with ``overrides`` and make ``source.paths`` and ``output.path`` absolute.

    Interpolations are resolved on the submitting machine. Relative paths are resolved against the
    submitting shell's directory, since the job's own working directory is a temporary copy on the
    cluster. Paths with a scheme (``s3://...``) are kept.
    """
    cfg = load(RunConfig, config, list(overrides))
    try:
        OmegaConf.resolve(cfg)  # interpolations (only omegaconf's own, e.g. ${oc.env:VAR}) resolve here
    except OmegaConfBaseException as e:
        raise ConfigError(f"{config}: {_first_line(e)}") from None
    cfg.source.paths = [_absolute(p) for p in cfg.source.paths]
    cfg.output.path = _absolute(cfg.output.path)
    return cfg


def runtime_env(workdir: Path, ship_package: bool = True) -> dict:
    """The job's runtime environment: ``workdir`` (holding the config) and, by default, the package."""
    env: dict = {"working_dir": str(workdir), "excludes": EXCLUDES}
    if ship_package:
        env["py_modules"] = [str(PACKAGE_DIR)]
    return env


def submit(
    config: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    address: str | None = None,
    token: str | None = None,
    submission_id: str | None = None,
    ship_package: bool = True,
    python: str = "python",
) -> str:
    """Submit the run described by ``config`` + ``overrides``; returns the job's submission id.

    Args:
        config: run config YAML (see ``examples/``).
        overrides: dotted ``key=value`` overrides applied on top.
        address: Jobs API URL (default: ``$RAY_ADDRESS``).
        token: bearer token for a cluster under token authentication.
        submission_id: job id to use (default: ``tokensift-<name>-<random>``).
        ship_package: upload this ``tokensift`` package with the job; ``False`` uses the one installed on
            the cluster.
        python: the interpreter the job runs with on the cluster (default: the first ``python`` on the
            head's ``PATH``); it must be able to import tokensift's dependencies.
    """
    cfg = job_config(config, overrides)
    client = connect(address, token)
    job_id = submission_id or f"tokensift-{_slug(cfg.name)}-{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="tokensift-job-") as tmp:
        workdir = Path(tmp)
        (workdir / JOB_CONFIG).write_text(to_yaml(cfg))
        shutil.copyfile(PACKAGE_DIR / "jobs" / "launch.py", workdir / LAUNCHER)
        request = dict(
            entrypoint=entrypoint(python=python),
            runtime_env=runtime_env(workdir, ship_package),
            submission_id=job_id,
            metadata={
                "tokensift_version": tokensift.__version__,
                "config": str(Path(config).resolve()),
                "output": cfg.output.path,
            },
        )
        deadline = time.monotonic() + AGENT_WAIT
        while True:
            try:
                return client.submit_job(**request)
            except RuntimeError as e:
                # a head that has just started answers HTTP before its job agent is up
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"
