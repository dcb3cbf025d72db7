"""The entry point of the `logra` command: parse, dispatch, and turn every error into status 2.

Every failure ends in one line on stderr, `logra CMD: error: ...`, and status 2: logra's own
errors, OS errors (a full disk, a read-only directory), and anything datasets, transformers or
numpy raise on bad input. No traceback is printed (set LOGRA_DEBUG=1 to get one). Warnings are
printed as one `logra CMD: warning: ...` line each. Ctrl-C exits 130.
Launched by torchrun or `accelerate launch`, the command runs in a process group (logra.cli.ranks).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from logra.cli.parser import build_parser
from logra.cli.ranks import RANK0_ONLY, on_rank0, process_group
from logra.errors import LograError


def _one_line(text: str, limit: int = 2000) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _describe(exc: BaseException) -> str:
    """One line for an exception that is not a LograError: the OS error's name and file, or its type."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, "OSError")
        where = f": {exc.filename}" if exc.filename else ""
        return f"{name} ({exc.strerror or exc}){where}. Check the path, its permissions and the free space."
    return f"{type(exc).__name__}: {exc or 'no message'} (an input could not be used as given; check the files passed)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 any error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    command = args.command

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        print(f"logra {command}: warning: {_one_line(str(message))}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            with process_group():  # under torchrun / accelerate launch: one group for the command
                return on_rank0(lambda: func(args)) if command in RANK0_ONLY else func(args)
    except KeyboardInterrupt:
        print(f"logra {command}: interrupted (committed shards are kept; rerun with --resume)", file=sys.stderr)
        return 130
    except Exception as exc:  # the command line's boundary: every failure is one line and status 2
        if os.environ.get("LOGRA_DEBUG"):
            raise
        text = str(exc) if isinstance(exc, LograError) else _describe(exc)
        print(f"logra {command}: error: {_one_line(text)}", file=sys.stderr)
        return 2
