"""Start and stop a single-machine Ray head (GCS, dashboard, Jobs API) bound to loopback.

The head runs as ``ray start --head --block`` in its own session, so stopping it ends exactly the
processes of that session (never ``ray stop``, which ends every Ray on the machine). Each head gets free
ports and its own ``--temp-dir``, so it does not collide with an embedded ``ray.init()`` running in the
same process.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

LOOPBACK = "127.0.0.1"


@dataclass
class LocalHead:
    """A running head started by :func:`start_head`.

    Args:
        process: the ``ray start --block`` process (leader of its own session).
        address: the dashboard / Jobs API URL, e.g. ``http://127.0.0.1:8265``.
        gcs_address: ``host:port`` of the GCS (what ``ray start --address`` joins).
        temp_dir: the head's ``--temp-dir`` (session logs).
        token: the bearer token when started with ``auth_mode="token"``, else ``None``.
    """

    process: subprocess.Popen
    address: str
    gcs_address: str
    temp_dir: Path
    token: str | None = None
    _owns_temp_dir: bool = field(default=False, repr=False)

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers a Jobs API client needs (the bearer token under token auth)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the head (it shuts its Ray processes down); after ``timeout`` seconds, SIGKILL whatever
        is left of its session."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        for pid in session_pids(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        if self._owns_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalHead:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_head(
    *,
    num_cpus: int = 2,
    object_store_memory: int = 1_000_000_000,
    host: str = LOOPBACK,
    auth_mode: str = "token",
    token: str | None = None,
    dashboard_port: int | None = None,
    temp_dir: str | Path | None = None,
    timeout: float = 120.0,
) -> LocalHead:
    """Start a Ray head and wait until its Jobs API answers.

    Args:
        num_cpus: CPUs the head offers to tasks and actors.
        object_store_memory: object store size in bytes (Ray's default is 30% of RAM).
        host: address every server binds to; loopback unless the head must be reachable from other nodes.
        auth_mode: ``token`` (every request needs the bearer token) or ``disabled``.
        token: the token under ``token`` mode; a fresh random one when ``None`` (never written to
            ``~/.ray/auth_token``, it is passed to the head through ``RAY_AUTH_TOKEN``).
        dashboard_port: Jobs API port (a free one when ``None``).
        temp_dir: Ray's session directory root (a new temporary one, removed on stop, when ``None``).
        timeout: seconds to wait for the Jobs API.

    Raises:
        RuntimeError: the head exited or did not answer in time; the message carries its log tail.
    """
    if auth_mode not in ("token", "disabled"):
        raise ValueError(f"auth_mode must be 'token' or 'disabled', got {auth_mode!r}")
    owns = temp_dir is None
    temp = Path(temp_dir or tempfile.mkdtemp(prefix="tsray-"))
    env = dict(os.environ, RAY_AUTH_MODE=auth_mode, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    # job entrypoints (``python -m tokensift.cli ...``) must find this interpreter, not the system one
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if auth_mode == "token":
        token = token or secrets.token_hex(32)
        env["RAY_AUTH_TOKEN"] = token
    else:
        token = None
        env.pop("RAY_AUTH_TOKEN", None)
    gcs_port, dash_port = free_port(host), dashboard_port or free_port(host)
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        "--node-ip-address", host, "--port", str(gcs_port),
        "--dashboard-host", host, "--dashboard-port", str(dash_port),
        "--ray-client-server-port", str(free_port(host)),
        "--dashboard-agent-listen-port", str(free_port(host)),
        "--num-cpus", str(num_cpus), "--object-store-memory", str(object_store_memory),
        "--temp-dir", str(temp), "--disable-usage-stats",
    ]
    log = open(temp / "head.log", "wb")  # noqa: SIM115 (kept open for the child's lifetime)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    head = LocalHead(proc, f"http://{host}:{dash_port}", f"{host}:{gcs_port}", temp, token, owns)
    deadline = time.monotonic() + timeout
    while not _answers(head.address + "/api/version", head.headers):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (temp / "head.log").read_text(errors="replace")[-3000:]
            head.stop()
            raise RuntimeError(f"Ray head did not come up at {head.address}:\n{tail}")
        time.sleep(0.5)
    return head


def session_pids(sid: int) -> list[int]:
    """Pids of the session ``sid`` (the head runs as its leader, so these are the processes it started)."""
    out = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                out.append(pid)
        except OSError:
            continue
    return out


def _answers(url: str, headers: dict[str, str]) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
