"""``tokensift status JOB``: a submitted job's status, run time and message."""

from __future__ import annotations

import argparse

from tokensift.jobs.client import add_address_argument, jobs_api_errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="submission id printed by tokensift submit")
    add_address_argument(parser)
    parser.add_argument("--wait", action="store_true",
                        help="block until the job ends; exit 0 only if it succeeded")


@jobs_api_errors
def main(args: argparse.Namespace) -> int:
    from tokensift.jobs.client import connect
    from tokensift.jobs.status import describe, wait

    client = connect(args.address)
    if args.wait:
        status = wait(client, args.job)
        print(describe(client, args.job))
        return 0 if status.value == "SUCCEEDED" else 1
    print(describe(client, args.job))
    return 0
