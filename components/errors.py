"""The suite's one error family, and the one place that turns an error into a message and a status.

    class DataError(InputError, ValueError): ...        # bad input: exit status 1
    class ConfigError(ParameterError, ValueError): ...  # bad parameters: exit status 2

    @command("distillery")
    def main(argv=None) -> int: ...                     # every command's entry point

Every error a user can cause (a malformed file, a parameter the configs refuse, an output folder
in use, a model the registry refuses, a server that will not start) is a DistilleryError
whose text is one line that names the file, row or key; `command` prints it as
`distillery: <message>` on stderr and returns its `exit_status` (1 bad input, 2 bad parameters),
never a traceback. An OSError that escapes a step (a disk full, a folder that cannot be made) is
reported the same way, with status 1. Anything else is a bug and keeps its traceback.

Messages quote what they were given through `excerpt`, so a parameter of a megabyte is never
echoed back whole.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

EXCERPT = 80
"""At most this many characters of a quoted value in a message."""


class DistilleryError(Exception):
    """An error the user can act on: reported in one line, exit status `exit_status`."""

    exit_status = 1


class InputError(DistilleryError):
    """Bad input (data, model folders, files, a refused operation): exit status 1."""


class ParameterError(DistilleryError):
    """A parameter (params.yaml, --set, a command-line option) that is refused: exit status 2."""

    exit_status = 2


def excerpt(value: Any, limit: int = EXCERPT) -> str:
    """`repr(value)`, cut to `limit` characters with the full length said."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def one_line(text: str, limit: int = 2000) -> str:
    """`text` on one line (a multi-line message's lines joined by " | "), at most `limit` characters."""
    joined = " | ".join(line.strip() for line in str(text).splitlines() if line.strip())
    return joined if len(joined) <= limit else joined[:limit] + "..."


def report(err: BaseException, prog: str) -> int:
    """Print `err` as one line on stderr; its exit status."""
    if isinstance(err, DistilleryError):
        message, status = str(err), err.exit_status
        prefix = "parameter error: " if status == 2 else ""
    elif isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        message, status, prefix = f"{where}{err.strerror or err}", 1, ""
    else:  # KeyboardInterrupt
        message, status, prefix = "interrupted", 130, ""
    print(f"{prog}: {prefix}{one_line(message)}", file=sys.stderr)
    return status


def command(prog: str) -> Callable[[Callable[..., int | None]], Callable[..., int]]:
    """Decorate a command's `main`: its DistilleryErrors and OSErrors become one line and a status."""
    def wrap(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> int:
            try:
                return main(*args, **kwargs) or 0
            except (DistilleryError, OSError, KeyboardInterrupt) as err:
                return report(err, prog)
        return run
    return wrap
