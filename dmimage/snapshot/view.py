"""The snapshot's content (origin overlaid with the COW's exceptions), and offline merging.

Both refuse a store whose view is not well defined: an invalidated snapshot (the kernel serves
only I/O errors) or one with damage store_problems reports about the data chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from dmimage.errors import DeviceError, MetadataError
from dmimage.format.snapshot_cow import area_chunk
from dmimage.ordered_write import Write, commit_last
from dmimage.snapshot.check import store_problems
from dmimage.snapshot.store import ExceptionStore, StoreState, read_at

WINDOW = 4 << 20

Progress = Callable[[int], None]


def ensure_servable(store: ExceptionStore) -> None:
    """Refuse a store whose snapshot has no well-defined content."""
    if store.state is StoreState.INVALID:
        raise MetadataError(f"{store.name}: the snapshot is invalidated (overflowed or I/O "
                            "error); the kernel serves no data from it", block=0,
                            field="header.valid")
    # Exceptions past the origin are never read; everything else makes the view ambiguous.
    problems = [p for p in store_problems(store) if p.index is not None]
    if problems:
        raise MetadataError(f"{store.name}: {problems[0]}"
                            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def iter_view(store: ExceptionStore, cow_fd: int, origin_fd: int, origin_bytes: int,
              origin_name: str, progress: Progress | None = None
              ) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) windows of the snapshot device, in order, covering ``origin_bytes``."""
    ensure_servable(store)
    cb = store.chunk_bytes or 1
    window = max(WINDOW // cb, 1) * cb
    order = np.argsort(store.old, kind="stable")
    olds = store.old[order]
    news = store.new[order]
    for w0 in range(0, origin_bytes, window):
        n = min(window, origin_bytes - w0)
        buf = bytearray(read_at(origin_fd, n, w0, origin_name))
        if len(buf) < n:
            raise DeviceError(f"{origin_name}: short read at byte {w0 + len(buf)}")
        if len(olds):
            lo, hi = np.searchsorted(olds, [w0 // cb, -(-(w0 + n) // cb)])
            for o, c in zip(olds[lo:hi].tolist(), news[lo:hi].tolist(), strict=True):
                start = o * cb - w0
                length = min(cb, n - start)
                data = read_at(cow_fd, length, c * cb, store.name)
                if len(data) < length:
                    raise DeviceError(f"{store.name}: short read of chunk {c}")
                buf[start:start + length] = data
        if progress is not None:
            progress(n)
        yield w0, bytes(buf)


def merge_into_origin(store: ExceptionStore, cow_fd: int, origin_fd: int, origin_bytes: int,
                      origin_name: str, progress: Progress | None = None) -> int:
    """Do offline what snapshot-merge does: copy every exception's chunk onto the origin, flush,
    then clear the exception areas (last first) and flush. Returns the chunks merged.

    Crash-safe by order: until the areas are cleared, every exception still points at data the
    COW device keeps unchanged, so running the merge again finishes it; clearing an area after
    the origin holds its chunks changes neither the origin's nor the snapshot's content.
    """
    ensure_servable(store)
    cb = store.chunk_bytes

    def copies() -> Iterator[Write]:
        for o, c in zip(store.old.tolist(), store.new.tolist(), strict=True):
            dst = o * cb
            if dst >= origin_bytes:
                continue  # never visible through the snapshot (its table ends at the origin)
            length = min(cb, origin_bytes - dst)
            data = read_at(cow_fd, length, c * cb, store.name)
            if len(data) < length:
                raise DeviceError(f"{store.name}: short read of chunk {c}")
            yield Write(origin_fd, dst, [memoryview(data)])
            if progress is not None:
                progress(length)

    zero = memoryview(bytes(cb))
    clears = [Write(cow_fd, area_chunk(area, store.per_area) * cb, [zero])
              for area in reversed(range(store.areas))]
    commit_last([origin_fd, cow_fd], copies(), clears)
    return len(store.old)

