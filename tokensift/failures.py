"""Failures a user causes or meets, and the one line each is reported as; anything else is a bug.

Expected: ``OSError`` (missing files, permissions, a read-only or full disk), Arrow's errors (unreadable or
conflicting data), and ``ValueError`` / ``RuntimeError`` raised by tokensift's own code (bad input named by
file, row and column; ``SourceError``; ``JobsError``; refused checkpoints). A Ray task error stands for its
original cause, raised in a worker; Ray Data keeps only the text of that cause, so it is read from there.
"""

from __future__ import annotations

import os
import re

from tokensift.config import _first_line

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# exception class names accepted when only a remote traceback's text is left of the original
REMOTE_EXPECTED = {
    "OSError", "FileNotFoundError", "FileExistsError", "PermissionError", "IsADirectoryError",
    "NotADirectoryError", "ValueError", "RuntimeError", "SourceError", "ConfigError",
    "ArrowInvalid", "ArrowTypeError", "ArrowIOError", "ArrowNotImplementedError", "ArrowKeyError",
}
_EXCEPTION_LINE = re.compile(r"^((?:\w+\.)*(\w+)): (.+)$", re.MULTILINE)
_ERRNO_TEXT = re.compile(r"^\[Errno (\d+)\] (.+?)(?:: '(.+)')?$")


def describe(e: BaseException) -> str | None:
    """The one-line message for an expected failure ``e``; ``None`` when ``e`` is a bug.

    Args:
        e: the exception a command raised.
    """
    cause = original(e)
    if cause is None:
        return None
    if isinstance(cause, OSError):
        if cause.strerror is None:
            return _first_line(cause)
        files = " -> ".join(str(f) for f in (cause.filename, cause.filename2) if f is not None)
        return f"{files}: {cause.strerror}" if files else cause.strerror
    remote = cause is not e
    ours = isinstance(cause, (ValueError, RuntimeError)) and (remote or _raised_by_tokensift(cause))
    if _is_arrow_error(cause) or ours:
        return _first_line(cause)
    return None


def original(e: BaseException) -> BaseException | None:
    """``e`` itself, or for a Ray task error the exception raised in the worker. Ray Data keeps only the text
    of that one: it is rebuilt from the first ``pkg.Class: message`` line of the remote traceback, as that
    class when it is an expected kind (an ``OSError`` with its errno, text and file name), else ``None``."""
    if not _is_ray_task_error(e):
        return e
    cause = getattr(e, "cause", None)
    if cause is not None and not _is_ray_task_error(cause) and type(cause).__name__ != "UserCodeException":
        return cause
    for match in _EXCEPTION_LINE.finditer(str(e)):
        qualified, name, message = match.groups()
        if not qualified.startswith("ray."):
            return _rebuild(name, message)
    return None


def _rebuild(name: str, message: str) -> BaseException | None:
    import builtins

    if name not in REMOTE_EXPECTED:
        return None
    if name in ("SourceError", "ConfigError"):
        from tokensift.config import ConfigError
        from tokensift.pipeline.sources import SourceError

        return {"SourceError": SourceError, "ConfigError": ConfigError}[name](message)
    if name.startswith("Arrow"):
        import pyarrow.lib

        return getattr(pyarrow.lib, name)(message)
    cls, errno = getattr(builtins, name), _ERRNO_TEXT.match(message)
    if errno and issubclass(cls, OSError):
        code, strerror, filename = errno.groups()
        return cls(int(code), strerror, filename)
    return cls(message)


def _raised_by_tokensift(e: BaseException) -> bool:
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(PACKAGE_DIR + os.sep)


def _is_ray_task_error(e: BaseException) -> bool:
    return any(c.__name__ == "RayTaskError" and c.__module__ == "ray.exceptions" for c in type(e).__mro__)


def _is_arrow_error(e: BaseException) -> bool:
    return any(c.__name__ == "ArrowException" and c.__module__.startswith("pyarrow") for c in type(e).__mro__)
