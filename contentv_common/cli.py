"""The error boundary every command line tool of the project shares.

A CLI's `main(argv)` raises `UsageError` for a bad flag or flag combination and `UserError` for a bad input it was
given (a file, key, shape, format or mismatch); `run_cli` turns those into one line on stderr,
`<prog>: error: <message>`, and the exit code (2 for usage, 1 for runtime), the way argparse answers a bad flag.
Anything else is a bug and keeps its traceback. `--debug` on the command line or `CONTENTV_DEBUG=1` in the
environment shows the traceback of user errors too.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
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
        # KeyError's str() is the repr of its argument; the others read as written
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {message}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except SystemExit as e:  # argparse has printed its own one-line error (or --help): keep its code
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return rc if isinstance(rc, int) else 0


# ---------------------------------------------------------------------------------------------
# argparse `type=` checks: a bad value is an argparse error naming the flag (exit 2), never a default.
# ---------------------------------------------------------------------------------------------
def _number(text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None


def finite_float(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonneg_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def nonneg_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def comma_list(text: str) -> list[str]:
    """'a,b , c' -> ['a', 'b', 'c']; empty items are an error."""
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of names, got {text!r}")
    return items


def probability(text: str) -> float:
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value:g}")
    return value


def guidance_scale(text: str) -> float:
    """Classifier-free guidance: >= 1 (1 = no guidance), or 0 = off."""
    value = finite_float(text)
    if value != 0 and value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (or 0 = off), got {value:g}")
    return value


def output_file(text: str) -> Path:
    """A file to write: not an existing folder, and no file standing where one of its folders should be (the
    folders themselves are made when it is written)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    existing = next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {existing} is a file, not a folder")
    return path


def output_dir(text: str) -> Path:
    """A folder to write into: not an existing file, and no file standing where one of its parents should be."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    existing = next((p for p in path.absolute().parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {existing} is a file, not a folder")
    return path
