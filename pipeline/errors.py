"""One path for user errors in every CLI: what went wrong, where, what to do — one line and an exit code.

A user error (a bad option, a missing or mismatched input) is raised as a
`UserError` subclass; `run_cli` prints its message on one line to stderr and
exits with the class's code. Anything else is a bug and keeps its traceback.

Exit codes: 0 ok, 1 a bug (Python's traceback), 2 a bad option or argument,
3 a missing input, 4 an input that does not match (another teacher,
tokenizer, schema), 5 corrupt data, 6 an output that cannot be written (the
disk is full, a quota, a read-only filesystem, no permission): what was
written before stays intact, and the same command resumes once it can write.
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


class CannotWrite(UserError, OSError):
    exit_code = 6


def user_message(exc: UserError) -> str:
    """The error's message on one line. One raised in a torch DataLoader worker comes back re-raised with the
    worker's traceback as its message ("Caught X in DataLoader worker process 0. Original Traceback ...
    module.X: message"): its own message is kept, and where it came from."""
    text = str(exc)
    marker = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    if text.startswith("Caught ") and "Original Traceback" in text and marker in text:
        where = text.split(".", 1)[0].split(" in ", 1)[-1]  # "DataLoader worker process 0"
        text = f"{text.rsplit(marker, 1)[1].strip()} (in {where})"
    return " ".join(text.split())


def close_progress_bars() -> None:
    """Close the tqdm bars still open (the error stopped their loop): each ends its line, so the error that
    follows has a line of its own instead of being written after a bar and under its last redraw."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(tqdm, "_instances", None) or ()):
        bar.close()


def run_cli(main: Callable[[], int | None], prog: str | None = None) -> int:
    """Run a CLI entry point; a UserError becomes `prog: error: message` and its exit code."""
    try:
        return int(main() or 0)
    except UserError as exc:
        close_progress_bars()
        name = prog or (sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "speechkd")
        # one write of the whole line: torchrun's ranks share a stderr, and a line written in one call stays whole
        sys.stderr.write(f"{name}: error: {user_message(exc)}\n")
        sys.stderr.flush()
        return exc.exit_code


def cli(prog: str):
    """Decorate a CLI's `main(argv=None)`: a UserError it raises becomes one line and its exit code (run_cli)."""

    def wrap(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(argv: list[str] | None = None) -> int:
            return run_cli(lambda: main(argv), prog=prog)

        return wrapped

    return wrap
