"""``tokensift sample-data OUT``: build the multi-domain sample corpus (news, math, code, instruction)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output directory (replaced if it holds an older build)")


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tokensift.data.sample import STEPS, build_sample

    with tqdm(total=len(STEPS), desc="sample-data", unit="step") as bar:

        def step(name: str) -> None:
            bar.set_postfix_str(name)
            bar.update()

        out = build_sample(args.out, progress=step)
    print(f"sample corpus written to {out} (see {out / 'README.md'})")
    return 0
