"""``tokensift preselect-train LOSSES --benchmark COL=SCORE ... --out model.bin``: PreSelect labels + fastText.

LOSSES is a snapshot written by a run with one ``lm_nll`` stage per model (examples/preselect_losses.yaml),
or any Parquet file / directory with ``id``, ``text`` and the loss columns. Each ``--benchmark`` names one
loss column and that model's benchmark score (higher = better model).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokensift.selectors.fasttext_text import FastTextParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("losses", help="snapshot directory, Parquet file or directory with id, text and loss columns")
    p.add_argument(
        "--benchmark",
        nargs="+",
        required=True,
        metavar="COLUMN=SCORE",
        help="a loss column (e.g. smollm2_bpc) and its model's benchmark score; one per model, at least two",
    )
    p.add_argument("--out", required=True, help="fastText model file to write (.bin)")
    p.add_argument("--text-column", default="text", help="document text column (default: text)")
    defaults = FastTextParams()
    for name, value in vars(defaults).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, help=f"fastText {name} (default: {value})")


def parse_benchmark(items: list[str]) -> dict[str, float]:
    """``["a_bpc=75.4", "b_bpc=81.2"]`` -> ``{"a_bpc": 75.4, "b_bpc": 81.2}``; names the bad item."""
    out = {}
    for item in items:
        column, sep, score = item.rpartition("=")
        try:
            out[column] = float(score)
        except ValueError:
            raise ValueError(f"--benchmark {item!r}: expected COLUMN=SCORE with a number as SCORE") from None
        if not sep or not column:
            raise ValueError(f"--benchmark {item!r}: expected COLUMN=SCORE")
    if len(out) < 2:
        raise ValueError("--benchmark: give at least two COLUMN=SCORE pairs (one per model)")
    return out


def read_losses(path: str):
    """A snapshot's ``data/`` shards, a Parquet file, or a directory of Parquet files, as one table."""
    import pyarrow.parquet as pq

    p = Path(path)
    if (p / "data").is_dir():
        p = p / "data"
    if not p.exists():
        raise FileNotFoundError(f"losses table not found: {path}")
    return pq.read_table(p)


def main(args: argparse.Namespace) -> int:
    from tokensift.selectors import preselect

    try:
        benchmark = parse_benchmark(args.benchmark)
        params = FastTextParams(**{k: getattr(args, k) for k in vars(FastTextParams())})
        stats = preselect.train(read_losses(args.losses), benchmark, args.out, params, args.text_column)
    except (ValueError, FileNotFoundError) as e:
        print(f"tokensift preselect-train: {e}", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2))
    return 0
