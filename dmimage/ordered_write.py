"""The one commit order every in-place writer follows: every block but the commit block, a
flush, the commit block, a flush.

The commit block (a pool superblock, an LVM metadata-area header) is what readers trust to find
everything else; until it lands, a crash leaves the old one pointing at the old, untouched
blocks, because the body only ever goes where the old commit does not point. Used by the pool
metadata writer (pdata/writer.py), the LVM generation writer (lvm/commit.py) and the
orphan-delete write-back (lvm/orphans.py), so the order is written down once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import NamedTuple

from dmimage.errors import DeviceError


class Write(NamedTuple):
    """``bufs`` at byte ``offset`` of ``fd``."""

    fd: int
    offset: int
    bufs: list[memoryview]


def pwrite_all(fd: int, bufs: list[memoryview], offset: int) -> None:
    """Write every byte of ``bufs`` at ``offset``: a short write is finished, not ignored."""
    try:
        total = sum(len(b) for b in bufs)
        done = os.pwritev(fd, bufs, offset)
        if done != total:  # short write: finish one buffer at a time
            data = b"".join(bytes(b) for b in bufs)
            while done < total:
                done += os.pwrite(fd, data[done:], offset + done)
    except OSError as exc:
        raise DeviceError(f"write at byte {offset} failed: {exc.strerror}") from None


def fsync_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError as exc:
            raise DeviceError(f"fsync failed: {exc.strerror}") from None


def commit_last(fds: Iterable[int], body: Iterable[Write], commit: Iterable[Write]) -> None:
    """Write ``body`` (may be a generator), flush every fd of ``fds``, write ``commit``, flush
    again. ``fds`` names every descriptor the writes use (a flush of each is the barrier)."""
    fds = list(dict.fromkeys(fds))
    for w in body:
        pwrite_all(w.fd, w.bufs, w.offset)
    fsync_all(fds)
    for w in commit:
        pwrite_all(w.fd, w.bufs, w.offset)
    fsync_all(fds)
