"""``python -m bench [--quick] [--only NAME ...]``: run every measure, write bench/results.md and .json.

Each module in ``bench/`` with a ``run(quick: bool) -> list[dict]`` function is one group of measures;
each row holds ``measure, ours, anchor, unit, ratio, note``, ours and anchor measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"__init__", "__main__"}


def modules() -> list[str]:
    """Bench modules (``ablate*`` is its own entry point: ``python -m bench.ablate``)."""
    return sorted(p.stem for p in HERE.glob("*.py") if p.stem not in SKIP and not p.stem.startswith(("ablate", "_")))


def machine() -> str:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}, torch {torch.__version__}"


def run(names: list[str], quick: bool) -> list[dict]:
    rows = []
    for name in names:
        start = time.perf_counter()
        try:
            got = importlib.import_module(f"bench.{name}").run(quick=quick)
        except Exception as e:  # one broken measure must not hide the others
            traceback.print_exc()
            got = [{"measure": name, "ours": None, "anchor": None, "unit": "", "ratio": None, "note": f"failed: {e}"}]
        for row in got:
            row["group"] = name
        rows += got
        print(f"bench {name}: {len(got)} row(s) in {time.perf_counter() - start:.1f} s", flush=True)
    return rows


def merge(previous: list[dict], rows: list[dict]) -> list[dict]:
    """``rows`` replace the previous rows of their groups; other groups' rows are kept; sorted by group."""
    ran = {r["group"] for r in rows}
    return sorted([r for r in previous if r.get("group") not in ran] + rows, key=lambda r: r["group"])


def write(rows: list[dict], out: Path, host: str) -> None:
    def fmt(v):
        text = "—" if v is None else f"{v:,.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "# tokensift benchmarks",
        "",
        f"Machine: {host}. Command: `python -m bench [--quick] [--only GROUP ...]` (`--only` replaces the rows of",
        "the groups it runs and keeps the others; the mode column says at which sizes each row was measured).",
        "Ours and anchor of each row are measured in the same run; ratio > 1 means ours is better (see note).",
        "",
        "| group | mode | measure | ours | anchor | unit | ratio | note |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | --- |",
    ]
    lines += [
        f"| {r['group']} | {r.get('mode', '')} | {r['measure']} | {fmt(r.get('ours'))} | {fmt(r.get('anchor'))} "
        f"| {r.get('unit', '')} | {fmt(r.get('ratio'))} | {fmt(r.get('note', ''))} |"
        for r in rows
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"machine": host, "rows": rows}, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (about a minute per group)")
    p.add_argument("--only", nargs="*", choices=modules(), help="run only these groups")
    p.add_argument("--out", type=Path, default=HERE / "results", help="output path without suffix (.md and .json)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    rows = run(args.only or modules(), args.quick)
    for row in rows:
        row["mode"] = f"{'quick' if args.quick else 'full'}, {time.strftime('%Y-%m-%d')}"
    json_path = args.out.with_suffix(".json")
    if args.only and json_path.is_file():
        rows = merge(json.loads(json_path.read_text())["rows"], rows)
    write(rows, args.out, machine())
    print(f"wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
