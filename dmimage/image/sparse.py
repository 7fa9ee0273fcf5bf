"""Sparse copies: holes stay holes, all-zero chunks are not written."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from dmimage.extents import data_ranges

CHUNK = 1 << 20
GRAIN = 64 << 10


def copy_sparse(fd_in: int, in_off: int, fd_out: int, out_off: int, length: int,
                progress: Callable[[int], None] | None = None) -> int:
    """Copy [in_off, in_off+length) to out_off, writing only non-zero 64 KiB grains.
    The output must already be zero (fresh or sparse) there. Returns bytes written."""
    written = 0
    for off, n in data_ranges(fd_in, in_off, length):
        done = 0
        while done < n:
            k = min(CHUNK, n - done)
            buf = os.pread(fd_in, k, off + done)
            arr = np.frombuffer(buf, np.uint8)
            for g in range(0, len(buf), GRAIN):
                if arr[g:g + GRAIN].any():
                    piece = buf[g:g + GRAIN]
                    os.pwrite(fd_out, piece, out_off + (off - in_off) + done + g)
                    written += len(piece)
            done += k
            if progress:
                progress(k)
    return written
