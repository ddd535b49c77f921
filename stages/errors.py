"""Errors a user can act on, and the thin wrapper that turns them into one line and a non-zero exit."""
from __future__ import annotations

import argparse
import sys


class PipelineError(Exception):
    """A problem with the input, the data or the environment, explained in one line."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (whitespace collapsed, cut at `limit` characters), or its
    class name when it has no message."""
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


def run(main, argv=None, description: str | None = None, add_arguments=None) -> None:
    """Parse the command line, call `main(args)`, and exit 2 with `error: ...` on a PipelineError.

    `--debug` shows the full traceback instead. Ctrl-C exits 130 with one line.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        main(args)
    except PipelineError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
