"""Follow a submitted job: wait for a terminal status, stream its logs, describe it in one line."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

from ray.job_submission import JobStatus, JobSubmissionClient

from tokensift.jobs.client import JobsError


def wait(client: JobSubmissionClient, job_id: str, timeout: float | None = None, poll: float = 1.0) -> JobStatus:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns that status.

    Raises:
        JobsError: ``timeout`` seconds passed first (the job keeps running).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while not (status := client.get_job_status(job_id)).is_terminal():
        if deadline is not None and time.monotonic() > deadline:
            raise JobsError(f"job {job_id} still {status.value} after {timeout:.0f} s")
        time.sleep(poll)
    return status


def follow_logs(client: JobSubmissionClient, job_id: str) -> Iterator[str]:
    """Yield the job's log output as it is written, from the start, until the job ends."""
    loop = asyncio.new_event_loop()
    tail = client.tail_job_logs(job_id)
    try:
        while True:
            try:
                yield loop.run_until_complete(tail.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(tail.aclose())
        loop.close()


def describe(client: JobSubmissionClient, job_id: str) -> str:
    """``<id>  <STATUS>  <message>`` plus run time, for ``tokensift status``."""
    info = client.get_job_info(job_id)
    line = f"{job_id}  {info.status.value}"
    if info.start_time:
        end = info.end_time or time.time() * 1000
        line += f"  {(end - info.start_time) / 1000:.1f} s"
    if info.message:
        line += f"  {info.message}"
    return line
