"""Every command's user errors as one line on stderr, what, where and the fix, and exit status 2.

A command's ``main`` hands its body to ``run_cli``. An error the user can fix (a bad config
value, a missing or unreadable file, a refused checkpoint: ``USER_ERRORS``) is printed as
one line, ``<prog>: error: <message>``, with no traceback, and the process exits with
status 2 (argparse's status for a usage error). ``--debug`` on the command line or
``MODUS_DEBUG=1`` in the environment lets the exception propagate with its traceback. Any
other exception is a bug and always propagates.

Under a launcher (``WORLD_SIZE`` > 1 in the environment) every rank exits with status 2,
and which ranks print depends on when the error came:

- before the process group exists (the config, the command line): every rank read the same
  files and would print the same line hundreds of times, so only rank 0 (``RANK``) prints;
- after (a data shard, a checkpoint, a release): the error may be one rank's own, and a
  silent rank would hide it, so every rank prints its line, prefixed ``rank N:``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

DEBUG_FLAG = "--debug"
DEBUG_ENV = "MODUS_DEBUG"
USER_ERROR_EXIT = 2  # argparse's status for a usage error


class UserError(Exception):
    """An input the user must fix that is not a ``ValueError`` (e.g. a missing resource); its message says how."""


# What a command reports as one line: config and input refusals, files missing or unreadable.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, UserError, FileNotFoundError, PermissionError,
                                                NotADirectoryError, IsADirectoryError)  # fmt: skip
_OS_FIXES = {
    FileNotFoundError: "check the path",
    PermissionError: "check the permissions of that path or choose another",
    NotADirectoryError: "a directory was expected: check the path",
    IsADirectoryError: "a file was expected: check the path",
}

T = TypeVar("T")


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    """Document ``--debug`` in a command's help (``run_cli`` reads it from the raw arguments)."""
    parser.add_argument(DEBUG_FLAG, action="store_true", help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")


def one_line(error: BaseException) -> str:
    """``error`` as one line: a multi-line message joined with "; ", an OS error with its path and a fix."""
    if isinstance(error, OSError) and error.filename is not None:
        fix = next((fix for kind, fix in _OS_FIXES.items() if isinstance(error, kind)), "check the path")
        text = f"{error.filename}: {error.strerror or error}; {fix}"
    else:
        text = str(error) or type(error).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def debug_requested(argv: Sequence[str]) -> bool:
    """Whether ``--debug`` is among ``argv`` or ``MODUS_DEBUG`` is set to a true value."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def _rank_prefix() -> str | None:
    """How this process prints a user error: "" plainly, "rank N: " with its rank, None not at all."""
    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ""
    dist = sys.modules.get("torch.distributed")  # not imported here: a command that never started one has none
    if dist is not None and dist.is_available() and dist.is_initialized():
        return f"rank {rank}: "
    return "" if rank == 0 else None


def run_cli(body: Callable[[list[str]], T], argv: Sequence[str] | None = None, prog: str | None = None) -> T:
    """Run ``body(argv)`` (default ``sys.argv[1:]``); a user error becomes one stderr line and exit status 2.

    ``prog`` heads the line (default: the script name). The body's own parser must accept
    ``--debug`` (``add_debug_argument``) if it is to be given.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return body(argv)
    except USER_ERRORS as error:
        if debug_requested(argv):
            raise
        prefix = _rank_prefix()
        if prefix is not None:
            name = prog or os.path.basename(sys.argv[0])
            print(f"{prefix}{name}: error: {one_line(error)} ({DEBUG_FLAG} or {DEBUG_ENV}=1 shows the traceback)",
                  file=sys.stderr, flush=True)  # fmt: skip
        raise SystemExit(USER_ERROR_EXIT) from None
