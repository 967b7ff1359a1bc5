"""``python -m bench.ablate [--quick] [--parts NAME ...]``: each method tested in the setting its paper claims.

Parts (``--parts``; each is ``bench/ablate_<name>.py`` with ``TITLE``, ``run(quick, work, log) -> dict`` and
``section(data) -> list[str]``: its setting, then tables of mean ± std with verdicts against twice the
standard error, numbers only):

1. ``preselect``: PreSelect labels from a family of models of different quality, classifier accuracy,
   equal-budget training.
2. ``votek``: vote-k choosing in-context demonstrations for topic classification.
3. ``sift``: SIFT choosing examples for one test prompt (in context, and test-time fine-tuning).
4. ``icon``: ICon scoring instruction candidates, then equal-budget fine-tuning.
5. ``tokenlevel``: ssToken, SHAD/RFT and cDPO fine-tuning a pretrained model; ESLM / Ada-ESLM at equal FLOPs.
6. ``features``: MoE global- vs micro-batch balancing and mixture-of-depths, seeds and a steps sweep.

The report (``--out``: ``bench/ablations.md`` for the whole run, ``runs/ablate/<parts>.md`` for a subset)
and its ``.json`` twin are rewritten after every part, so an interrupted run keeps what it measured; a part
that fails says ``unavailable: <error>`` and the others still run. Every run has an id; the hand-written
reading (``bench/ablate_reading.md``) is appended only when its first line names that id, so a rerun never
shows an old reading under new numbers. ``--render`` rewrites the report from its JSON twin (no measuring),
which is how the reading is attached once written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = ("preselect", "votek", "sift", "icon", "tokenlevel", "features")
FIRST = "features"  # its workers fork the process: it runs before Ray or DeepSpeed start in it
READING = HERE / "ablate_reading.md"
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu",
       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false"}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ablate", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="parts: " + ", ".join(PARTS))
    p.add_argument("--quick", action="store_true", help="small sizes and few steps (a smoke run of a few minutes)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default: all)")
    p.add_argument("--out", type=Path, help="markdown report, .json beside it (default: bench/ablations.md for "
                   "every part, runs/ablate/<parts>.md otherwise)")
    p.add_argument("--work", type=Path, default=Path("runs/ablate"), help="scratch and cache directory")
    p.add_argument("--fresh", action="store_true", help="delete --work first: a from-scratch run")
    p.add_argument("--render", action="store_true", help="measure nothing: rewrite --out from its .json twin "
                   "(after writing the reading)")
    args = p.parse_args(argv)
    if args.out is None:
        whole = list(args.parts) == list(PARTS) and not args.quick
        args.out = HERE / "ablations.md" if whole else args.work / f"{'-'.join(args.parts)}{'-quick' * args.quick}.md"
    return args


class Report:
    """Results so far, rewritten to markdown + JSON after every part."""

    def __init__(self, args: argparse.Namespace, argv: list[str], from_scratch: bool):
        from bench.__main__ import machine

        self.args, self.start = args, time.time()
        self.run_id = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.meta = {"run_id": self.run_id, "command": " ".join(["python -m bench.ablate", *argv]),
                     "machine": machine(), "mode": "quick" if args.quick else "full", "from_scratch": from_scratch}
        self.parts: dict[str, dict] = {}

    @classmethod
    def load(cls, args: argparse.Namespace) -> Report:
        """The report of an earlier run, from the JSON twin of ``args.out``."""
        saved = json.loads(args.out.with_suffix(".json").read_text())
        report = cls.__new__(cls)
        report.args, report.parts = args, saved.pop("parts")
        report.meta, report.run_id = saved, saved["run_id"]
        report.start = time.time() - 60 * saved["wall_minutes"]
        return report

    def add(self, name: str, data: dict, seconds: float) -> None:
        self.parts[name] = {"seconds": round(seconds), "data": data}
        self.write()

    def write(self) -> None:
        m, minutes = self.meta, (time.time() - self.start) / 60
        lines = ["# Ablations: each method in the setting its paper makes claims for", "",
                 f"Command: `{m['command']}` (repository root). Machine: {m['machine']}.",
                 f"Run {m['run_id']}, {m['mode']} mode, {'from scratch (empty work directory)' if m['from_scratch'] else 'reusing the work directory'}; "
                 f"wall time {minutes:.1f} min; per part: "
                 + (", ".join(f"{n} {p['seconds'] / 60:.1f} min" for n, p in self.parts.items()) or "none yet") + ".", ""]
        for name in PARTS:
            if name in self.parts:
                lines += [f"## {_module(name).TITLE}", "", *_section(name, self.parts[name]["data"]), ""]
        lines += _reading(self.run_id)
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text("\n".join(lines) + "\n")
        saved = {**m, "wall_minutes": round(minutes, 1), "parts": self.parts}
        self.args.out.with_suffix(".json").write_text(json.dumps(saved, indent=1, default=str))


def _module(name: str):
    return importlib.import_module(f"bench.ablate_{name}")


def _section(name: str, data: dict) -> list[str]:
    if "unavailable" in data:
        return [f"Unavailable: {data['unavailable']}"]
    try:
        return _module(name).section(data)
    except Exception as e:  # the measured data stays in the JSON; the report must still be written
        traceback.print_exc()
        return [f"Section unavailable ({type(e).__name__}: {e}); the part's data is in the JSON report."]


def _reading(run_id: str) -> list[str]:
    text = READING.read_text() if READING.is_file() else ""
    if text.splitlines()[:1] == [f"Run: {run_id}"]:
        return ["## Reading (written after the run, from the tables above)", "", *text.splitlines()[1:]]
    return ["## Reading", "", f"No reading of run {run_id} yet: it is written after the run, from the tables above "
            f"(`{READING.relative_to(HERE.parent)}`, first line `Run: {run_id}`)."]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.render:
        Report.load(args).write()
        print(f"wrote {args.out}")
        return 0
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    report = Report(args, argv, from_scratch=not args.work.exists() or not any(args.work.iterdir()))
    for name in sorted(args.parts, key=lambda n: n != FIRST):
        t0 = time.time()
        try:
            data = _module(name).run(args.quick, args.work / name, lambda msg: print(f"ablate {msg}", flush=True))
        except Exception as e:  # one broken part must not hide the others
            traceback.print_exc()
            data = {"unavailable": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        report.add(name, data, time.time() - t0)
        print(f"ablate {name}: {(time.time() - t0) / 60:.1f} min", flush=True)
    port = os.environ.get("MASTER_PORT")  # DeepSpeed's shared-memory buffers of this process
    for f in Path("/dev/shm").glob(f"deepspeed_*_{port}_*") if port else []:
        f.unlink(missing_ok=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
