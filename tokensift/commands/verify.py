"""``tokensift verify SNAPSHOT``: check shard checksums, row counts and the file list."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("snapshot", help="snapshot directory (holds manifest.json and data/)")


def main(args: argparse.Namespace) -> int:
    from tokensift.pipeline.snapshot import verify

    problems = verify(args.snapshot)
    for line in problems:
        print(line, file=sys.stderr)
    print(f"{args.snapshot}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0
