"""``tokensift report SNAPSHOT``: write ``<snapshot>/report/index.md`` with PNG plots."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("snapshot", type=Path, help="snapshot directory (holds manifest.json and data/)")


def main(args: argparse.Namespace) -> int:
    from tokensift.pipeline.report import write_report

    print(f"report written to {write_report(args.snapshot)}")
    return 0
