"""Jobs on a real local Ray head: ``ray start --head`` on loopback with token auth, Jobs API only.

The session's embedded Ray (fixture ``ray_local``) may run in this same process, so this module talks to
its own head only over HTTP (``JobSubmissionClient``) and through subprocesses; it never calls
``ray.init``. One head serves the whole module.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import os
import subprocess
import sys
import time

import psutil
import pyarrow.parquet as pq
import pytest
from ray.job_submission import JobSubmissionClient

from tokensift.jobs.client import connect
from tokensift.jobs.head import LOOPBACK, session_pids, start_head
from tokensift.jobs.status import follow_logs, wait
from tokensift.jobs.submit import submit
from tokensift.pipeline.snapshot import verify

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "examples", "quickstart.yaml")
# the quickstart's one-line alternative without models: the longest half of the documents by tokens
LENGTH_CUT = "stages=[{stage: tokenize}, {stage: score_threshold, column: n_tokens, top_p: 0.5, weight: docs}]"


@pytest.fixture(scope="module")
def head():
    with start_head(num_cpus=2, object_store_memory=500_000_000, auth_mode="token") as h:
        yield h
    deadline = time.monotonic() + 10  # killed processes are reaped by their parents or init
    while session_pids(h.process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not session_pids(h.process.pid), "processes of the head survived its stop"
    assert not h.temp_dir.exists()


@pytest.fixture(scope="module")
def jobs(head, sample_dir, tmp_path_factory):
    """Submit the quickstart and two broken runs at once, so they share the head's start-up time."""
    tmp = tmp_path_factory.mktemp("jobs")
    src = f"source.paths=[{sample_dir}/*.parquet]", LENGTH_CUT
    # what a head started as `.venv/bin/ray start` (venv not activated) runs jobs with: a python whose
    # site-packages lack tokensift's dependencies
    bare = tmp / "python-without-site-packages"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    ids = {
        "ok": submit(QUICKSTART, [*src, f"output.path={tmp / 'snap'}"], address=head.address, token=head.token),
        "wrong_python": submit(QUICKSTART, [*src, f"output.path={tmp / 'bad'}"], address=head.address,
                               token=head.token, python=str(bare)),
        "no_input": f"tokensift-no-input-{os.getpid()}",
    }
    # this one goes through the command line, following its logs to the end
    follower = cli(head, "submit", str(QUICKSTART), f"source.paths=[{tmp / 'missing' / 'news.parquet'}]",
                   f"output.path={tmp / 'none'}", "--job-id", ids["no_input"], "--follow", wait=False)
    yield ids, tmp, follower
    follower.kill()


@functools.cache
def followed(proc: subprocess.Popen) -> tuple[str, str]:
    """Stdout and stderr of a ``tokensift submit --follow`` subprocess, once it has ended."""
    return proc.communicate(timeout=240)


def cli(head, *argv: str, wait: bool = True):
    """``tokensift ARGV --address HEAD`` in a subprocess whose shell carries the token the Ray way."""
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.token)
    proc = subprocess.Popen([sys.executable, "-m", "tokensift.cli", *argv, "--address", head.address],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_jobs_api_refuses_requests_without_the_token(head):
    with pytest.raises(Exception, match="[Aa]uthentication"):
        JobSubmissionClient(head.address).list_jobs()


def test_quickstart_job_succeeds_and_writes_the_snapshot(head, jobs, sample_dir):
    ids, tmp, _ = jobs
    client = connect(head.address, head.token)
    logs = "".join(follow_logs(client, ids["ok"]))
    assert wait(client, ids["ok"], timeout=300).value == "SUCCEEDED", logs[-3000:]
    assert "snapshot written" in logs

    out = tmp / "snap"
    assert verify(out) == []
    source_ids = [i for f in sorted(sample_dir.glob("*.parquet")) for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]
    kept = pq.read_table(out / "data")
    kept_ids = kept.column("id").to_pylist()
    assert len(kept_ids) == len(set(kept_ids)) == math.ceil(0.5 * len(source_ids))  # quickstart: top_p 0.5 of docs
    assert set(kept_ids) <= set(source_ids)
    manifest = json.loads((out / "manifest.json").read_text())
    threshold = manifest["stages"][1]["stats"]["threshold"]
    assert min(kept.column("n_tokens").to_pylist()) >= threshold
    assert manifest["config"]["ray"]["address"] == "auto"  # it ran inside the job, on the cluster

    status = cli(head, "status", ids["ok"])
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout, status.stderr
    printed = cli(head, "logs", ids["ok"])
    assert printed.returncode == 0 and "snapshot written" in printed.stdout


def test_head_listens_on_loopback_only(head, jobs):
    """After a job ran (workers, agents and job drivers up), every socket of the head's session is loopback."""
    assert head.address.startswith(f"http://{LOOPBACK}:")
    sid = os.getsid(head.process.pid)
    listening = set()
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                listening |= {c.laddr for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        except (OSError, psutil.Error):
            continue  # a worker that exited meanwhile
    assert len(listening) >= 3, listening  # at least GCS, raylet, dashboard
    for ip, port in listening:
        addr = ipaddress.ip_address(ip)
        addr = getattr(addr, "ipv4_mapped", None) or addr
        assert addr.is_loopback, f"the head listens on {ip}:{port}"


@pytest.mark.parametrize("which, error", [
    ("wrong_python", "cannot import 'omegaconf'. Jobs run with the `python` first on the PATH"),
    ("no_input", "no such file or directory"),
])
def test_broken_job_fails_with_its_error_in_the_logs(head, jobs, which, error):
    ids, tmp, follower = jobs
    if which == "no_input":
        followed(follower)  # that job is submitted by the command line: let it finish first
    client = connect(head.address, head.token)
    assert wait(client, ids[which], timeout=180).value == "FAILED"
    logs = client.get_job_logs(ids[which])
    assert error in logs and "Traceback" not in logs, logs[-3000:]
    assert not (tmp / "bad").exists() and not (tmp / "none").exists()


def test_submit_follow_streams_the_logs_and_exits_with_the_jobs_failure(jobs):
    ids, _, follower = jobs
    out, err = followed(follower)
    assert follower.returncode == 1, err
    assert "no such file or directory" in out
    assert f"{ids['no_input']} FAILED" in err


def test_stop_ends_a_running_job(head, jobs, sample_dir):
    _, tmp, _ = jobs
    job = submit(QUICKSTART, [f"source.paths=[{sample_dir}/*.parquet]", LENGTH_CUT, f"output.path={tmp / 'stopped'}"],
                 address=head.address, token=head.token)
    client = connect(head.address, head.token)
    deadline = time.monotonic() + 120
    while client.get_job_status(job).value == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.5)
    stopped = cli(head, "stop", job)
    assert stopped.returncode == 0, stopped.stderr
    assert client.get_job_status(job).value == "STOPPED"
    assert not (tmp / "stopped").exists()
