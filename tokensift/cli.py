"""``tokensift``: one console script, one module per subcommand under ``tokensift.commands``.

Each command module has ``HELP`` (one line), ``add_arguments(parser)`` and ``main(args) -> int``. Modules
are imported only when their command runs, so ``tokensift --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from tokensift import __version__
from tokensift.config import ConfigError

VERBOSE_HELP = "show tracebacks, and Ray's own logs and progress on the console"
# command -> (module, one-line help); the module is imported only to run or describe that command
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("tokensift.commands.run", "run a selection job (embedded local Ray, or --address) and write a snapshot"),
    "verify": ("tokensift.commands.verify", "check a snapshot's shard checksums and row counts"),
    "bench": ("tokensift.commands.bench", "run the side-by-side benchmarks (writes bench/results.md)"),
    "sample-data": ("tokensift.commands.sample_data", "build the shipped multi-domain sample corpus"),
    "report": ("tokensift.commands.report", "write a snapshot's human report (markdown + PNG plots) into <snapshot>/report"),
    "submit": ("tokensift.commands.submit", "submit a selection job to a Ray cluster (Jobs API); --follow streams logs"),
    "status": ("tokensift.commands.status", "show a submitted job's status"),
    "logs": ("tokensift.commands.logs", "print a submitted job's logs; --follow streams them"),
    "stop": ("tokensift.commands.stop", "stop a submitted job"),
    "preselect-train": ("tokensift.commands.preselect_train", "PreSelect: per-model losses -> labels -> fastText model"),
    "train": ("tokensift.commands.train", "train a model with DeepSpeed on a snapshot's weighted tokens (torchrun for >1 process)"),
}

EPILOG = """examples:
  tokensift run examples/quickstart.yaml                       embedded local Ray, shipped sample data
  tokensift run examples/quickstart.yaml output.path=/tmp/s    dotted overrides after the config
  tokensift run examples/quickstart.yaml --dry-run             print the resolved config, do nothing
  tokensift verify /tmp/s                                      check checksums and counts
"""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (all of them when ``command`` is None)."""
    parser = argparse.ArgumentParser(
        prog="tokensift",
        description="Select training documents and weight their tokens, on Ray Data and DeepSpeed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tokensift {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        if command in (None, name):
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    named = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(named if named in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)  # overrides may follow flags: `run c.yaml --dry-run a.b=1`
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if not args.command:
        parser.print_help()
        return 2
    from tokensift.pipeline.ray_env import set_console

    set_console(args.verbose)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.main(args) or 0)
    except ConfigError as e:
        return _report(args, f"config error: {e}", 2)
    except KeyboardInterrupt:
        return _report(args, "interrupted; run it again to resume", 130)
    except Exception as e:
        from tokensift.failures import describe

        message = describe(e)
        if message is None:  # a bug: the traceback is what helps
            raise
        return _report(args, message, 1)


def _report(args: argparse.Namespace, message: str, code: int) -> int:
    """One ``tokensift <command>: ...`` line on stderr (after the traceback with ``--verbose``); returns ``code``."""
    if args.verbose and code != 130:
        traceback.print_exc()
    print(f"tokensift {args.command}: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
