"""Errors a user can act on, and the thin wrapper that turns them into one line and a non-zero exit."""
from __future__ import annotations

import argparse
import http.client
import sys
import urllib.error


class PipelineError(Exception):
    """A problem with the input, the data or the environment, explained in one line."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """Why `exc` happened, in one short line whatever raised it: an HTTP status, an OS error's own
    text (strerror), else the message with its whitespace collapsed, else the class name."""
    if isinstance(exc, urllib.error.HTTPError):
        text = f"HTTP {exc.code} {exc.reason}"
    elif isinstance(exc, http.client.HTTPException):
        text = f"bad HTTP response: {type(exc).__name__} {exc}"
    elif isinstance(exc, urllib.error.URLError):
        text = str(exc.reason)
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc)
    return " ".join(text.split())[:limit] or type(exc).__name__


def run(main, argv=None, description: str | None = None, add_arguments=None) -> None:
    """Parse the command line, call `main(args)`, and exit 2 with `error: ...` on a PipelineError.

    `--debug` shows the full traceback instead. Ctrl-C exits 130 with one line. The exit codes of every
    stage and tool: 0 done, 2 a problem the message explains (argparse's usage errors too), 130 Ctrl-C,
    1 a crash (a bug: the traceback says where). `--help` names the command as it is run
    (`python -m stages.train`) and shows every default.
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    parser = argparse.ArgumentParser(prog=f"python -m {spec.name}" if spec and spec.name else None,
                                     description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
