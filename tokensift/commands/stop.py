"""``tokensift stop JOB``: stop a running job and wait until Ray reports it stopped."""

from __future__ import annotations

import argparse

from tokensift.jobs.client import add_address_argument, jobs_api_errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="submission id printed by tokensift submit")
    add_address_argument(parser)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the job to end")


@jobs_api_errors
def main(args: argparse.Namespace) -> int:
    from tokensift.jobs.client import connect
    from tokensift.jobs.status import describe, wait

    client = connect(args.address)
    if not client.stop_job(args.job):
        print(f"{describe(client, args.job)}  (already ended)")
        return 0
    wait(client, args.job, timeout=args.timeout)
    print(describe(client, args.job))
    return 0
