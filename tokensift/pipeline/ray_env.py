"""Start or join Ray: the embedded default is a local Ray in this process, on loopback."""

from __future__ import annotations

import logging
import os
import secrets
import sys


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
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        object_store_memory=object_store_memory,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
    )
