"""The lock plan of a subcommand: which files it locks, shared or exclusive, and the
``--lock-timeout`` option every such subcommand takes. ``cli/main.py`` takes the plan's locks
(``dmimage.devlock``) before the command runs and holds them until it is done."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

#: (path or None, exclusive) for each file a command reads or writes in place
LockPlan = Callable[[argparse.Namespace], list[tuple[str | None, bool]]]

LOCK_HELP = ("wait at most this long for another dmimage process's lock on the metadata or "
             "data file (default: wait as long as it takes; 0: do not wait); exit 2 on timeout")


def parse_seconds(text: str) -> float:
    """A non-negative number of seconds."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if v < 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a non-negative number: {text!r}")
    return v


def add_lock_plan(p: argparse.ArgumentParser, plan: LockPlan) -> None:
    """Give subcommand ``p`` its lock plan and the --lock-timeout option."""
    p.add_argument("--lock-timeout", type=parse_seconds, metavar="SECONDS", help=LOCK_HELP)
    p.set_defaults(lock_plan=plan)
