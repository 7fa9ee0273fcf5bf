"""Discard the unprovisioned space of a pool's data device (thin_trim 1.1's job, offline).

What thin_trim 1.1.0 does (read from its source):

* runs a full thin_check of the metadata first and refuses on any error (exit 65);
* requires the data device to be at least nr_data_blocks × data_block_size × 512 bytes
  ("unexpected data device size, wanted N bytes");
* reads the *data space map* of the live superblock and discards every maximal run of blocks
  whose count is 0 (the gaps between runs of counted blocks, and the tail up to
  nr_data_blocks), with one BLKDISCARD ioctl each, in ascending order;
* it issues BLKDISCARD on regular files too, which the kernel refuses (ENOTTY), so 1.1 only
  works on block devices.

Ours does the same selection, with our own check (refusing on any problem, leaks included)
and, as a further guard, refuses if any block mapped by a device (or by the held metadata
snapshot) has count 0. On a regular file it punches holes (fallocate PUNCH_HOLE|KEEP_SIZE);
on a block device it issues BLKDISCARD. ``dry_run`` only lists the ranges.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dmimage import devlock
from dmimage.errors import DeviceError, MetadataError
from dmimage.format.constants import SECTOR_SIZE
from dmimage.thin.pool import Pool, open_pool

if TYPE_CHECKING:
    from dmimage.progress import Progress

__all__ = ["TrimRange", "unprovisioned_ranges", "check_before_trim", "trim_data", "punch_hole",
           "blkdiscard"]

BLKDISCARD = 0x1277  # _IO(0x12, 119)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


@dataclass(slots=True, frozen=True)
class TrimRange:
    """Data blocks [begin, end) and the byte range they cover on the data device."""

    begin: int
    end: int
    offset: int
    length: int


def unprovisioned_ranges(pool: Pool) -> list[TrimRange]:
    """Maximal runs of data blocks whose data-space-map count is 0, ascending."""
    counts = pool.data_space_map().counts
    bs = pool.live_superblock.data_block_size * SECTOR_SIZE
    free = counts == 0
    n = len(free)
    if n == 0 or not free.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate([[False], free, [False]]).astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    return [TrimRange(int(b), int(e), int(b) * bs, (int(e) - int(b)) * bs)
            for b, e in zip(starts.tolist(), ends.tolist(), strict=True)]


def _guard_mapped(pool: Pool, counts: np.ndarray) -> None:
    """Refuse if a mapped data block has count 0 (a space map that disagrees with the trees)."""
    pools = [pool]
    held = pool.live_superblock.held_root
    if held:
        pools.append(open_pool(pool.reader.path, metadata_snap=held))
    try:
        for p in pools:
            for dev_id in p.devices():
                data = p.mappings(dev_id).data
                if not len(data):
                    continue
                if int(data.max()) >= len(counts):
                    raise MetadataError(f"device {dev_id} maps data block {int(data.max())} "
                                        f"beyond nr_data_blocks {len(counts)}")
                zero = counts[data.astype(np.int64)] == 0
                if zero.any():
                    raise MetadataError(
                        f"device {dev_id} maps data block {int(data[zero][0])}, whose "
                        "data space map count is 0: refusing to trim")
    finally:
        for p in pools[1:]:
            p.close()


_libc = None


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE) on a regular file."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def blkdiscard(fd: int, offset: int, length: int) -> None:
    """BLKDISCARD on a block device."""
    fcntl.ioctl(fd, BLKDISCARD, struct.pack("=QQ", offset, length))


def check_before_trim(metadata: str | os.PathLike[str], progress: Progress | None = None
                      ) -> None:
    """The full check a trim starts with: any problem (leaks included) raises
    MetadataError. ``progress``: as :func:`~dmimage.thin.check.check_metadata`'s."""
    from dmimage.thin.check import check_metadata

    report = check_metadata(metadata, progress=progress)
    if not report.ok():
        first = report.problems[0]
        raise MetadataError(f"metadata contains errors ({len(report.problems)} problems, "
                            f"first: {first}); run dmimage check", block=first.block)


def trim_data(metadata: str | os.PathLike[str], data: str | os.PathLike[str], *,
              dry_run: bool = False, check: bool = True,
              progress: Progress | None = None) -> list[TrimRange]:
    """Discard every unprovisioned range of ``data``; returns the ranges (all of them, also
    with ``dry_run``). ``check=False`` skips the full metadata check (not the mapped-block
    guard): for a caller that ran :func:`check_before_trim` under the same locks.
    ``progress``: told the ranges to discard, then each one discarded."""
    with devlock.acquire_all([(metadata, False), (data, not dry_run)]):
        return _trim_locked(metadata, data, dry_run, check, progress)


def _trim_locked(metadata: str | os.PathLike[str], data: str | os.PathLike[str],
                 dry_run: bool, check: bool, progress: Progress | None) -> list[TrimRange]:
    if check:
        check_before_trim(metadata)
    with open_pool(metadata) as pool:
        counts = pool.data_space_map().counts
        _guard_mapped(pool, counts)
        ranges = unprovisioned_ranges(pool)
        sb = pool.live_superblock
        expected = sb.nr_data_blocks * sb.data_block_size * SECTOR_SIZE
    path = os.fspath(data)
    flags = os.O_RDONLY if dry_run else os.O_WRONLY
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise DeviceError(f"{path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        is_blk = stat.S_ISBLK(st.st_mode)
        if not is_blk and not stat.S_ISREG(st.st_mode):
            raise DeviceError(f"{path}: not a block device or regular file")
        size = os.lseek(fd, 0, os.SEEK_END) if is_blk else st.st_size
        if size < expected:
            raise DeviceError(f"{path}: unexpected data device size {size}, wanted "
                              f"{expected} bytes")
        if dry_run:
            return ranges
        op = blkdiscard if is_blk else punch_hole
        if progress is not None:
            progress.set_total(len(ranges))
        for r in ranges:
            if progress is not None:
                progress(1)
            try:
                op(fd, r.offset, r.length)
            except OSError as exc:
                what = "BLKDISCARD" if is_blk else "punching a hole"
                hint = " (not supported here)" if exc.errno in (errno.EOPNOTSUPP,
                                                                 errno.ENOTTY) else ""
                raise DeviceError(f"{path}: {what} at byte {r.offset}: "
                                  f"{exc.strerror}{hint}") from None
        if not is_blk:
            os.fsync(fd)
    finally:
        os.close(fd)
    return ranges
