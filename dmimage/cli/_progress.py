"""The one progress bar of the CLI: drawn on stderr (rich, transient) only when stderr is a
terminal, so scripts, pipes and CI logs stay clean; otherwise ``advance`` does nothing.

Used by the commands that can run for long on real pools: restore (mappings), build, write,
export, snapshot export/merge, cache writeback, docker export (bytes); each draws nothing with
``-q`` where it has one."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

Advance = Callable[[int], None]


class Bar:
    """What :func:`progress_bar` yields: call it with the units just done; ``set_total``
    when the size of the task is learnt after the bar started (a build knows its bytes
    only after planning). Does nothing when no bar is drawn."""

    def __init__(self, advance: Advance | None = None,
                 set_total: Callable[[int], None] | None = None) -> None:
        self._advance = advance
        self._set_total = set_total

    def __call__(self, n: int) -> None:
        if self._advance is not None:
            self._advance(n)

    def set_total(self, total: int) -> None:
        if self._set_total is not None:
            self._set_total(total)


@contextmanager
def progress_bar(label: str, total: int | None = None, *,
                 unit: Literal["bytes", "items"] = "bytes",
                 enabled: bool = True) -> Iterator[Bar]:
    """Yield ``advance(n)`` (a :class:`Bar`) for a task of ``total`` units (None: unknown
    until ``set_total``).

    Both units show the time left (ETA); ``unit="bytes"`` adds size and speed (export,
    build, write), ``"items"`` a percentage (restore's mappings). ``enabled=False``
    (``--quiet``, or a task too small to watch) draws nothing, as does a stderr that is not
    a terminal.
    """
    if not enabled or not sys.stderr.isatty():
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns: list[ProgressColumn] = [TextColumn(label), BarColumn()]
    if unit == "bytes":
        columns += [DownloadColumn(), TransferSpeedColumn()]
    else:
        columns += [TextColumn("{task.percentage:>3.0f}%")]
    columns.append(TimeRemainingColumn())
    # rich's default console is stdout, which may be the command's output.
    with Progress(*columns, console=Console(stderr=True), transient=True) as prog:
        task = prog.add_task(label, total=total)

        def advance(n: int) -> None:
            prog.advance(task, n)

        def set_total(n: int) -> None:
            prog.update(task, total=n)

        yield Bar(advance, set_total)
