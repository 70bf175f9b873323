"""The error boundary every command line tool of the project shares.

A CLI's `main(argv)` raises `UsageError` for a bad flag or flag combination and `UserError` for a bad input it was
given (a file, key, shape, format or mismatch); `run_cli` turns those into one line on stderr,
`<prog>: error: <message>`, and the exit code (2 for usage, 1 for runtime), the way argparse answers a bad flag.
Anything else is a bug and keeps its traceback. `--debug` on the command line or `CONTENTV_DEBUG=1` in the
environment shows the traceback of user errors too.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence


class UserError(Exception):
    """A problem with what the user gave us (a file, key, shape, value): one named line, exit 1."""

    exit_code = 1


class UsageError(UserError):
    """A bad flag value or flag combination, found before any work starts: exit 2, as argparse does."""

    exit_code = 2


# OS errors that always mean "the path you gave": their messages name the file.
PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
DEBUG_ENV = "CONTENTV_DEBUG"


def debug_requested(argv: Sequence[str] | None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"show the Python traceback of every error (also: {DEBUG_ENV}=1)")


def run_cli(prog: str, main: Callable[[list[str] | None], object], argv: list[str] | None = None,
            user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run `main(argv)` behind the shared boundary; returns the process exit code.

    `user_errors` adds exception types (beyond `UserError` and the path errors) that this CLI's libraries raise
    for bad input with a message that names the culprit.
    """
    known = (UserError, *PATH_ERRORS, *user_errors)
    try:
        rc = main(argv)
    except known as e:
        if debug_requested(argv):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return rc if isinstance(rc, int) else 0
