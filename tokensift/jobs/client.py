"""Connect to a Ray cluster's Jobs API (``http://HOST:8265``) and turn its failures into one clear message.

The address comes from ``--address``, else ``$RAY_API_SERVER_ADDRESS`` / ``$RAY_ADDRESS`` (Ray's own
variables). Under token authentication (``RAY_AUTH_MODE=token`` on the cluster) Ray's client sends the
token found in ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` when the submitting
shell also sets ``RAY_AUTH_MODE=token``; a token can also be given explicitly.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable

from tokensift.config import _first_line

ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class JobsError(RuntimeError):
    """The cluster could not be reached, or it refused or does not know the request."""


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--address`` option shared by ``submit``, ``status``, ``logs`` and ``stop``."""
    parser.add_argument(
        "--address",
        default=None,
        help="Ray Jobs API URL, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)",
    )


def resolve_address(address: str | None) -> str:
    """``address``, else the first of ``$RAY_API_SERVER_ADDRESS`` / ``$RAY_ADDRESS`` that is set."""
    for value in (address, *(os.environ.get(name) for name in ADDRESS_ENV)):
        if value:
            return value
    raise JobsError("no cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS")


def connect(address: str | None = None, token: str | None = None):
    """A ``ray.job_submission.JobSubmissionClient`` for ``address`` (checked to answer).

    Args:
        address: Jobs API URL; see :func:`resolve_address`.
        token: bearer token for a cluster under token authentication (default: Ray's own lookup).
    """
    from ray.job_submission import JobSubmissionClient

    from tokensift.pipeline.ray_env import quiet_ray_logs

    quiet_ray_logs()
    url = resolve_address(address)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise JobsError(f"cannot use the Ray Jobs API at {url}: {_first_line(e)}") from None


def jobs_api_errors(main: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Decorate a command's ``main`` so the Jobs API's own failures (Ray's ``RuntimeError`` for an unknown
    job, a dropped connection) become a :class:`JobsError`, which the command line reports as one line."""

    @functools.wraps(main)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return main(args)
        except JobsError:
            raise
        except (RuntimeError, ConnectionError) as e:
            raise JobsError(_first_line(e)) from e

    return wrapped
