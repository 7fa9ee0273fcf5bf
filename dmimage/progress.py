"""What a long library task reports its progress to (the CLI draws it: cli/_progress.py).

The read and repair paths (check, dump, ls, delta, rmap, repair, pack, unpack, trim) learn the
size of their task only once the metadata is open, so they take one object for both: call it
with the units just done, ``set_total`` when the total is known. Library code imports this
module for typing only; anything with these two methods will do."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Phases", "Progress"]


class Progress(Protocol):
    def __call__(self, n: int) -> None: ...

    def set_total(self, total: int) -> None: ...


class Phases:
    """One progress for a task of several passes that each learn their own total (the check
    before a fix and the one after it; repair's scan, walk and write): a pass's total is
    added to the units the earlier passes did, so the bar extends instead of going back."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self._base = 0
        self._done = 0

    def __call__(self, n: int) -> None:
        self._done += n
        if self._progress is not None:
            self._progress(n)

    def set_total(self, total: int) -> None:
        if self._progress is not None:
            self._progress.set_total(self._base + total)

    def next_pass(self) -> None:
        """Start another pass: its total will count from what is done now."""
        self._base = self._done
