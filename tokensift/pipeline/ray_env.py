"""Start or join Ray: the embedded default is a local Ray in this process, on loopback.

Ray talks a lot on the console: its Python INFO lines, Ray Data's progress and execution plans, the C++
core worker's ``E ... core_worker.cc`` lines on this process's stderr, and whatever workers print. The
command line asks for a quiet console (:func:`set_console`, on unless ``--verbose``): all of that then goes
to Ray's log directory (``ray-data.log``, ``python-core-driver-*.log``, ``worker-*.err`` and
``tokensift-driver.err`` for this process's native stderr), and the console keeps tokensift's own progress
bars, summary and errors. Library use keeps Ray's defaults.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys

_QUIET = False


def set_console(verbose: bool) -> None:
    """Quiet Ray's console output (``verbose=False``) or keep Ray's defaults; call before :func:`ensure_ray`."""
    global _QUIET
    _QUIET = not verbose


def quiet_ray_logs() -> None:
    """Under a quiet console, Ray's Python loggers (e.g. the Jobs client's upload lines) show errors only;
    call after ``ray`` is imported (it sets its loggers up on import)."""
    if _QUIET:  # on the handlers: some of Ray's modules set their own loggers to INFO
        for handler in logging.getLogger("ray").handlers:
            handler.setLevel(logging.ERROR)


def ensure_ray(address: str | None = None, num_cpus: int | None = None, object_store_memory: int | None = None):
    """Connect to Ray once per process.

    Args:
        address: ``None`` starts an embedded local Ray (loopback only, no dashboard, token
            authentication with a fresh token unless ``$RAY_AUTH_MODE`` is set); ``auto`` or
            ``ray://host:10001`` joins an existing cluster, as does a set ``$RAY_ADDRESS``.
        num_cpus: CPUs of the embedded Ray (``None``: all of this machine's).
        object_store_memory: bytes for the embedded Ray's object store.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address and "RAY_AUTH_MODE" not in os.environ and "ray" not in sys.modules:
        # the embedded Ray gets a fresh token: other users of this machine cannot reach it on loopback
        # (Ray reads its auth mode at import, so this only works before ray is first imported)
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # Ray reads these when it is first imported: they keep it on loopback and quiet
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    level = logging.ERROR if _QUIET else logging.WARNING
    if address:
        ray.init(address=address, logging_level=level, log_to_driver=not _QUIET)
    else:
        ray.init(
            address="local",  # a new Ray of our own, never one another process started on this machine
            num_cpus=num_cpus or os.cpu_count(),
            object_store_memory=object_store_memory,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level=level,
            log_to_driver=not _QUIET,
        )
    if _QUIET:
        node = ray._private.worker._global_node  # None for a ray:// client, which has no native core worker
        if node is not None:
            _native_stderr_to(os.path.join(node.get_logs_dir_path(), "tokensift-driver.err"))


def _native_stderr_to(path: str) -> None:
    """Point file descriptor 2 (where Ray's C++ core worker logs) at ``path``; Python's ``sys.stderr``
    (progress bars, messages, tracebacks) keeps writing to the console through a duplicate of it."""
    sys.stderr.flush()
    console = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    sys.stderr = console
