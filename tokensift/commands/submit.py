"""``tokensift submit CONFIG [key=value ...] --address http://HOST:8265``: run a selection job on a cluster."""

from __future__ import annotations

import argparse
import sys

from tokensift.jobs.client import add_address_argument, jobs_api_errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML (see examples/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. output.path=/shared/snap")
    add_address_argument(parser)
    parser.add_argument("--job-id", default=None, help="submission id (default: tokensift-<name>-<random>)")
    parser.add_argument("--follow", action="store_true",
                        help="stream the job's logs until it ends; exit 0 only if it succeeded")
    parser.add_argument("--no-package", action="store_true",
                        help="use the tokensift installed on the cluster instead of uploading this one")
    parser.add_argument("--python", default="python",
                        help="interpreter on the cluster that can import tokensift's dependencies, e.g. "
                             "/opt/venv/bin/python (default: the first python on the head's PATH)")


@jobs_api_errors
def main(args: argparse.Namespace) -> int:
    from tokensift.jobs.client import connect
    from tokensift.jobs.status import follow_logs, wait
    from tokensift.jobs.submit import submit

    job_id = submit(args.config, args.overrides, address=args.address, submission_id=args.job_id,
                    ship_package=not args.no_package, python=args.python)
    where = f" --address {args.address}" if args.address else ""
    print(f"submitted {job_id}", file=sys.stderr)
    if not args.follow:
        print(f"  tokensift status {job_id}{where}\n  tokensift logs {job_id}{where} --follow", file=sys.stderr)
        print(job_id)
        return 0
    client = connect(args.address)
    try:
        for chunk in follow_logs(client, job_id):
            print(chunk, end="", flush=True)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (tokensift stop {job_id}{where})", file=sys.stderr)
        return 130
    status = wait(client, job_id, timeout=60)
    print(f"{job_id} {status.value}", file=sys.stderr)
    return 0 if status.value == "SUCCEEDED" else 1
