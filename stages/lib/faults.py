"""Fault injection at deterministic points, for the tests: no sleeping and hoping a signal lands mid-run.

    TUDUI_FAULT=sigkill@step=25        the 25th SGD step of the run sends SIGKILL to its own process
    TUDUI_FAULT=sigint@step=25         ... SIGINT (Ctrl-C)
    TUDUI_FAULT=sigkill@checkpoint=2   killed while the 2nd checkpoint is written: its temporary file is
                                       complete, the rename has not happened yet
    TUDUI_FAULT=sigstop@step=25        stopped (SIGSTOP) at step 25, until the test sends SIGCONT

Unset (always, outside the tests) every call is a dictionary lookup and nothing else.
"""
from __future__ import annotations

import os
import signal

VARIABLE = "TUDUI_FAULT"
SIGNALS = {"sigkill": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sigstop": signal.SIGSTOP}


def at(point: str, count: int) -> None:
    """Send the configured signal to this process if TUDUI_FAULT names `point`=`count`."""
    spec = os.environ.get(VARIABLE)
    if not spec:
        return
    name, _, where = spec.partition("@")
    wanted, _, number = where.partition("=")
    if name not in SIGNALS or not number.isdigit():
        raise ValueError(f"{VARIABLE}={spec!r}: expected <{'|'.join(SIGNALS)}>@<point>=<n>")
    if wanted == point and int(number) == count:
        os.kill(os.getpid(), SIGNALS[name])
