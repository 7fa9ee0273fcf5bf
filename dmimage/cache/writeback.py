"""Offline writeback: copy every dirty cache block from the fast device to the origin.

This is the rescue for a cache device about to be removed: afterwards the origin alone holds
what the cached device served. The copy leaves the metadata as it is; cache/clear_dirty.py
then clears the copied blocks' dirty bits (the CLI's default, as cache_writeback 1.1's).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from dmimage.cache.metadata import CacheMetadata
from dmimage.errors import DeviceError, MetadataError
from dmimage.ordered_write import pwrite_all
from dmimage.pdata.block import device_size

Progress = Callable[[int], None]


def dirty_blocks(md: CacheMetadata) -> tuple[np.ndarray, np.ndarray]:
    """(cache blocks, origin blocks) of every valid dirty mapping, in cache-block order."""
    n = len(md.mappings)
    dirty = np.zeros(n, bool)
    d = md.dirty
    dirty[:min(n, len(d))] = d[:n]
    pick = np.flatnonzero(md.valid & dirty)
    return pick, md.origin_blocks[pick]


def writeback(md: CacheMetadata, fast_fd: int, fast_name: str, origin_fd: int,
              origin_name: str, progress: Progress | None = None) -> int:
    """Copy the dirty blocks, then flush the origin; returns how many were copied."""
    bs = md.sb.data_block_size * 512
    cblocks, oblocks = dirty_blocks(md)
    fast_size = device_size(fast_fd)
    origin_size = device_size(origin_fd)
    if len(cblocks) and (int(cblocks.max()) + 1) * bs > fast_size:
        raise MetadataError(f"cache block {int(cblocks.max())} lies past the end of "
                            f"{fast_name} ({fast_size} bytes)", field="mapping array")
    if len(oblocks) and int(oblocks.max()) * bs >= origin_size:
        raise MetadataError(f"origin block {int(oblocks.max())} lies past the end of "
                            f"{origin_name} ({origin_size} bytes)", field="mapping array")
    for c, o in zip(cblocks.tolist(), oblocks.tolist(), strict=True):
        try:
            data = os.pread(fast_fd, bs, c * bs)
        except OSError as exc:
            raise DeviceError(f"{fast_name}: read of cache block {c} failed: "
                              f"{exc.strerror}") from None
        n = min(bs, origin_size - o * bs)
        pwrite_all(origin_fd, [memoryview(data)[:n]], o * bs)
        if progress is not None:
            progress(n)
    try:
        os.fsync(origin_fd)
    except OSError as exc:
        raise DeviceError(f"{origin_name}: fsync failed: {exc.strerror}") from None
    return len(cblocks)
