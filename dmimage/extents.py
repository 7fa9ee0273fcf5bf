"""A file's data extents: the ranges SEEK_DATA/SEEK_HOLE report as possibly holding data.

Sparse images and metadata files are mostly holes. Readers that skip holes (a sparse copy,
repair's scan for btree nodes) and writers that must not fill them share this one walk."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator


def data_ranges(fd: int, start: int, length: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data (non-hole) ranges of [start, start+length) of ``fd``.
    Where the file system cannot tell (no SEEK_DATA), the whole range is data."""
    end = start + length
    pos = start
    while pos < end:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, end - pos
                return
            raise
        if d >= end:
            return
        h = min(os.lseek(fd, d, os.SEEK_HOLE), end)
        yield d, h - d
        pos = h
