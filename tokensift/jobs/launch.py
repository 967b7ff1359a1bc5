"""The entrypoint of a submitted job, copied into its ``working_dir`` as ``tokensift_job.py``.

A job runs under whatever ``python`` the cluster's job agent finds: the first one on the ``PATH`` of the
shell that started the head (``.venv/bin/ray start`` without activating the venv finds the system one), or
the interpreter given with ``tokensift submit --python``. So this script imports only the standard library
until it has checked that the interpreter can import everything a run needs, and otherwise fails with one
message naming the interpreter, the missing module and how to fix the head, instead of a
``ModuleNotFoundError`` from deep inside a run.
"""

from __future__ import annotations

import sys

FIX = ("Jobs run with the `python` first on the PATH of the shell that started the head. Start the head from "
       "tokensift's environment (`source .venv/bin/activate` before `ray start --head ...`), or submit with "
       "`tokensift submit --python /path/to/venv/bin/python ...`.")


def main(argv: list[str]) -> int:
    """``tokensift run ARGV --address auto`` on the cluster the job runs in, if this interpreter can."""
    try:
        import tokensift.pipeline.runner  # noqa: F401  imports every dependency of a run
    except ModuleNotFoundError as e:
        print(f"tokensift job: {sys.executable} (Python {sys.version.split()[0]}) cannot import {e.name!r}. {FIX}",
              file=sys.stderr)
        return 1
    from tokensift.cli import main as cli_main

    return cli_main(["run", *argv, "--address", "auto"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
