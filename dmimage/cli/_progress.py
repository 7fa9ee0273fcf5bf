"""The one progress bar of the CLI: drawn on stderr (rich, transient) only when stderr is a
terminal, so scripts, pipes and CI logs stay clean; otherwise ``advance`` does nothing."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

Advance = Callable[[int], None]


def _ignore(n: int) -> None:
    pass


@contextmanager
def progress_bar(label: str, total: int | None = None, *,
                 unit: Literal["bytes", "items"] = "bytes",
                 enabled: bool = True) -> Iterator[Advance]:
    """Yield ``advance(n)`` for a task of ``total`` units (None: unknown).

    ``unit="bytes"`` shows size and speed (export, build); ``"items"`` a percentage and the
    time left (restore's mappings). ``enabled=False`` (``--quiet``, or a task too small to
    watch) draws nothing, as does a stderr that is not a terminal.
    """
    if not enabled or not sys.stderr.isatty():
        yield _ignore
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
        columns += [TextColumn("{task.percentage:>3.0f}%"), TimeRemainingColumn()]
    # rich's default console is stdout, which may be the command's output.
    with Progress(*columns, console=Console(stderr=True), transient=True) as prog:
        task = prog.add_task(label, total=total)

        def advance(n: int) -> None:
            prog.advance(task, n)

        yield advance
