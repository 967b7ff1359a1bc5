"""``tokensift logs JOB [--follow]``: a submitted job's driver output."""

from __future__ import annotations

import argparse

from tokensift.jobs.client import add_address_argument, jobs_api_errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="submission id printed by tokensift submit")
    add_address_argument(parser)
    parser.add_argument("--follow", "-f", action="store_true", help="keep streaming until the job ends")


@jobs_api_errors
def main(args: argparse.Namespace) -> int:
    from tokensift.jobs.client import connect
    from tokensift.jobs.status import follow_logs

    client = connect(args.address)
    if args.follow:
        for chunk in follow_logs(client, args.job):
            print(chunk, end="", flush=True)
    else:
        print(client.get_job_logs(args.job), end="")
    return 0
