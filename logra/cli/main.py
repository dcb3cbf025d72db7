"""The entry point of the `logra` command: parse, dispatch, and turn logra errors into status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from logra.cli.parser import build_parser
from logra.errors import LograError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 a logra error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except LograError as exc:
        print(f"logra {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"logra {args.command}: interrupted (committed shards are kept; rerun with --resume)", file=sys.stderr)
        return 130

