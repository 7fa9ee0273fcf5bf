"""What a long library task reports its progress to (the CLI draws it: cli/_progress.py).

The read and repair paths (check, dump, ls, delta, rmap, repair, pack, unpack, trim) learn the
size of their task only once the metadata is open, so they take one object for both: call it
with the units just done, ``set_total`` when the total is known. Library code imports this
module for typing only; anything with these two methods will do."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Progress"]


class Progress(Protocol):
    def __call__(self, n: int) -> None: ...

    def set_total(self, total: int) -> None: ...
