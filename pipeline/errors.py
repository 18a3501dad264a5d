"""One path for user errors in every CLI: what went wrong, where, what to do — one line and an exit code.

A user error (a bad option, a missing or mismatched input) is raised as a
`UserError` subclass; `run_cli` prints its message on one line to stderr and
exits with the class's code. Anything else is a bug and keeps its traceback.

Exit codes: 0 ok, 1 a bug (Python's traceback), 2 a bad option or argument,
3 a missing input, 4 an input that does not match (another teacher,
tokenizer, schema), 5 corrupt data.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    exit_code = 2


class MissingInput(UserError, FileNotFoundError):
    exit_code = 3


class InputMismatch(UserError, ValueError):
    exit_code = 4


class CorruptData(UserError, ValueError):
    exit_code = 5


def run_cli(main: Callable[[], int | None], prog: str | None = None) -> int:
    """Run a CLI entry point; a UserError becomes `prog: error: message` and its exit code."""
    try:
        return int(main() or 0)
    except UserError as exc:
        name = prog or (sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "speechkd")
        message = " ".join(str(exc).split())  # one line, whatever the message's own layout
        print(f"{name}: error: {message}", file=sys.stderr)
        return exc.exit_code


def cli(prog: str):
    """Decorate a CLI's `main(argv=None)`: a UserError it raises becomes one line and its exit code (run_cli)."""

    def wrap(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(argv: list[str] | None = None) -> int:
            return run_cli(lambda: main(argv), prog=prog)

        return wrapped

    return wrap
