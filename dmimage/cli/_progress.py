"""The one progress bar of the CLI: drawn on stderr (rich, transient) only when stderr is a
terminal, so scripts, pipes and CI logs stay clean; otherwise ``advance`` does nothing.

Used by the commands that can run for long on real pools: check (also with --auto-repair: the
check before the fix and the one after), delta, repair and dump --repair (mappings; a
salvage that scans for roots counts the scanned blocks first), dump (leaves), ls, rmap
(metadata blocks), trim (ranges), restore (input bytes), build, write, export, pack, unpack,
snapshot export/merge, cache writeback, docker export (bytes); each draws nothing with
``-q`` where it has one."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

Advance = Callable[[int], None]


#: Below these totals a task ends well inside 2 s on a loaded machine: no bar (read through
#: the module, so tests may lower them). Mappings walked (check, delta) or written (repair),
#: metadata blocks (ls, rmap) or leaves (dump), metadata bytes (pack), pack-file bytes
#: (unpack: about 1/15 of the metadata), data ranges discarded (trim), dump bytes (restore).
MIN_MAPPINGS = 200_000
MIN_BLOCKS = 2_000
MIN_BYTES = 32 << 20
MIN_PACKED_BYTES = 1 << 20
MIN_RANGES = 20_000
#: restore's input: about 200,000 mappings of thin_dump XML
MIN_DUMP_BYTES = 14 << 20


class Bar:
    """What :func:`progress_bar` yields: call it with the units just done; ``set_total``
    when the size of the task is learnt after the bar started (a build knows its bytes
    only after planning). Does nothing when no bar is drawn."""

    def __call__(self, n: int) -> None:
        pass

    def set_total(self, total: int) -> None:
        pass


class _Drawn(Bar):
    """A rich bar on stderr, started as soon as the task is known to be worth it (a total of
    at least ``min_total``; at once when ``min_total`` is 0). Advances are summed and handed
    to rich about a thousand times per task, so a walk may report every leaf batch."""

    def __init__(self, label: str, unit: Literal["bytes", "items"], min_total: int) -> None:
        self._label, self._unit, self._min = label, unit, min_total
        self._prog: Progress | None = None
        self._task: TaskID | None = None
        self._done = 0  # units reported before the bar started
        self._pending = 0
        self._step = 1
        if min_total <= 0:
            self._start(None)

    def _start(self, total: int | None) -> None:
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

        columns: list[ProgressColumn] = [TextColumn(self._label), BarColumn()]
        if self._unit == "bytes":
            columns += [DownloadColumn(), TransferSpeedColumn()]
        else:
            columns += [TextColumn("{task.percentage:>3.0f}%")]
        columns.append(TimeRemainingColumn())
        # rich's default console is stdout, which may be the command's output.
        self._prog = Progress(*columns, console=Console(stderr=True), transient=True)
        self._prog.start()
        self._task = self._prog.add_task(self._label, total=total, completed=self._done)

    def set_total(self, total: int) -> None:
        self._step = max(1, total // 1000)
        if self._prog is None:
            if total >= self._min:
                self._start(total)
            return
        assert self._task is not None
        self._prog.update(self._task, total=total)

    def __call__(self, n: int) -> None:
        if self._prog is None:
            self._done += n
            return
        self._pending += n
        if self._pending >= self._step:
            assert self._task is not None
            self._prog.advance(self._task, self._pending)
            self._pending = 0

    def close(self) -> None:
        if self._prog is None:
            return
        if self._pending:
            assert self._task is not None
            self._prog.advance(self._task, self._pending)
            self._pending = 0
        self._prog.stop()


@contextmanager
def progress_bar(label: str, total: int | None = None, *,
                 unit: Literal["bytes", "items"] = "bytes",
                 enabled: bool = True, min_total: int = 0) -> Iterator[Bar]:
    """Yield ``advance(n)`` (a :class:`Bar`) for a task of ``total`` units (None: unknown
    until ``set_total``).

    Both units show the time left (ETA); ``unit="bytes"`` adds size and speed (export,
    build, write), ``"items"`` a percentage (restore's mappings). ``enabled=False``
    (``--quiet``) draws nothing, as does a stderr that is not a terminal, or a total below
    ``min_total`` (a task too small to watch; with ``min_total`` the bar waits for a total).
    """
    if not enabled or not sys.stderr.isatty():
        yield Bar()
        return
    bar = _Drawn(label, unit, min_total)
    try:
        if total is not None:
            bar.set_total(total)
        yield bar
    finally:
        bar.close()
