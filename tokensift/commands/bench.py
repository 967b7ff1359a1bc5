"""``tokensift bench [--quick] [--only ...]``: run ``python -m bench`` from a source checkout."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to `python -m bench` (--quick, --only NAME...)")


def main(args: argparse.Namespace) -> int:
    if not (Path.cwd() / "bench" / "__main__.py").is_file():
        print("tokensift bench: run it from the tokensift source checkout (needs ./bench)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "bench", *args.bench_args])
