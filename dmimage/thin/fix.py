"""In-place fixes of thin-pool metadata that checks clean apart from non-fatal problems: what
``dmimage check --auto-repair`` and ``--clear-needs-check-flag`` do (thin_check's options).

* clearing NEEDS_CHECK alone rewrites block 0 only, with the same bytes except the flags and
  the checksum: the kernel's own commit point, a single-sector write;
* fixing leaked blocks or a wrong nr_allocated goes through :class:`WritablePool`: both space
  maps are written afresh to blocks that the committed state does not use (leaked blocks
  included), flushed, and the superblock is written last and flushed again. A crash leaves
  either the old or the repaired pool.

:func:`fix_in_place` holds the exclusive lock throughout and opens the device once for I/O:
the check before, the fix and the check after all go through the same descriptor and
mapping, so nothing can change between the check and the write. Fatal damage is never
written to; salvaging it is ``thin/repair.py``'s job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import numpy as np

from dmimage import devlock
from dmimage.errors import DeviceError, MetadataError
from dmimage.format.constants import BLOCK_SIZE, NEEDS_CHECK_FLAG
from dmimage.format.superblock import Superblock
from dmimage.pdata.block import BlockReader
from dmimage.progress import Phases, Progress
from dmimage.thin.check import CheckReport, check_metadata
from dmimage.thin.superblock import read_superblock

__all__ = ["FixResult", "fix_in_place", "clear_needs_check"]


@dataclass(slots=True)
class FixResult:
    """What :func:`fix_in_place` found and did. ``after`` is the check after the fix (or the
    only check when nothing was written)."""

    before: CheckReport
    after: CheckReport
    written: bool = False
    cleared_needs_check: bool = False
    freed_metadata_blocks: list[int] = field(default_factory=list)
    freed_data_blocks: list[int] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)


def _open_rw(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise DeviceError(f"{path}: cannot open for writing: {exc.strerror}") from None


def clear_needs_check(path: str | os.PathLike[str]) -> bool:
    """Clear NEEDS_CHECK by rewriting block 0 alone (flags and checksum change, nothing else).

    Returns False if the flag was not set. The caller decides whether the pool deserves it.
    """
    p = os.fspath(path)
    with devlock.hold(p, exclusive=True):
        fd = _open_rw(p)
        try:
            return _clear_needs_check(fd, p)
        finally:
            os.close(fd)


def _clear_needs_check(fd: int, path: str) -> bool:
    block = bytearray(os.pread(fd, BLOCK_SIZE, 0))
    if len(block) != BLOCK_SIZE:
        raise MetadataError("too short to hold a superblock", block=0)
    sb = Superblock.unpack(block)
    if not sb.flags & NEEDS_CHECK_FLAG:
        return False
    replace(sb, flags=sb.flags & ~NEEDS_CHECK_FLAG).pack_into(block)
    try:
        if os.pwrite(fd, bytes(block), 0) != BLOCK_SIZE:
            raise DeviceError(f"{path}: short write of the superblock")
        os.fsync(fd)
    except OSError as exc:
        raise DeviceError(f"{path}: writing the superblock failed: {exc.strerror}") from None
    return True


def fix_in_place(path: str | os.PathLike[str], *, auto_repair: bool = False,
                 clear_needs_check_flag: bool = False,
                 ignore_non_fatal: bool = False, progress: Progress | None = None) -> FixResult:
    """Check ``path`` and, if allowed and safe, fix it in place (thin_check's options).

    * ``auto_repair``: free leaked metadata and data blocks, recompute both nr_allocated, and
      clear NEEDS_CHECK -- only when no fatal problem exists.
    * ``clear_needs_check_flag``: clear NEEDS_CHECK when the check passes (with
      ``ignore_non_fatal``: passes apart from non-fatal problems).

    Fatal damage is never written to: the result then just carries the report.
    ``progress`` hears of the mappings walked by the check, and by the check after a write
    (as a second pass of one task).
    """
    p = os.fspath(path)
    # The lock lives on its own descriptor: the mapping keeps a duplicate of ``fd`` while
    # numpy views of it live, and a lock on that description would outlive the call.
    with devlock.hold(p, exclusive=True):
        fd = _open_rw(p)
        try:
            try:
                reader = BlockReader(p, fd=fd)
            except MetadataError:
                # Too small to hold a superblock: the check reports it; nothing to fix.
                report = check_metadata(p)
                return FixResult(report, report)
            with reader:
                return _fix(p, fd, reader, auto_repair, clear_needs_check_flag,
                            ignore_non_fatal, Phases(progress))
        finally:
            os.close(fd)


def _fix(path: str, fd: int, reader: BlockReader, auto_repair: bool,
         clear_needs_check_flag: bool, ignore_non_fatal: bool, progress: Phases) -> FixResult:
    before = check_metadata(path, reader=reader, progress=progress)
    result = FixResult(before, before)
    if not before.ok(ignore_non_fatal=True):
        return result  # fatal damage: leave it to `dmimage repair`
    try:
        needs_check = read_superblock(reader, 0).needs_check
    except MetadataError:
        needs_check = False
    repairable = [p for p in before.problems if not p.fatal]
    if auto_repair and repairable:
        _rewrite_space_maps(path, fd, reader, before, result)
        result.cleared_needs_check = needs_check
        result.written = True
    elif (auto_repair or (clear_needs_check_flag and before.ok(ignore_non_fatal)))\
            and needs_check:
        result.cleared_needs_check = _clear_needs_check(fd, path)
        result.written = result.cleared_needs_check
        if result.cleared_needs_check:
            result.actions.append("cleared NEEDS_CHECK")
    if result.written:
        # The mapping shares the page cache with the writes just made: it sees the new state.
        progress.next_pass()
        result.after = check_metadata(path, reader=reader, progress=progress)
    return result


def _rewrite_space_maps(path: str, fd: int, reader: BlockReader, report: CheckReport,
                        result: FixResult) -> None:
    from dmimage.thin.transaction import WritablePool

    with WritablePool(path, fd=fd, reader=reader) as wp:
        meta = wp.tx.meta.counts
        data = wp.tx.data.counts
        leaked_meta = [b for b in report.leaked_metadata_blocks if b < len(meta) and meta[b] == 1]
        leaked_data = [b for b in report.leaked_data_blocks if b < len(data) and data[b] == 1]
        if leaked_meta:
            meta[np.asarray(leaked_meta, dtype=np.int64)] = 0
            result.actions.append(f"freed {len(leaked_meta)} leaked metadata blocks")
        if leaked_data:
            data[np.asarray(leaked_data, dtype=np.int64)] = 0
            result.actions.append(f"freed {len(leaked_data)} leaked data blocks")
        result.freed_metadata_blocks = leaked_meta
        result.freed_data_blocks = leaked_data
        if wp.sb.needs_check:
            result.actions.append("cleared NEEDS_CHECK")
        # Marks the transaction dirty; the commit rewrites both space maps from the counts
        # (nr_allocated recomputed) to unused blocks, then the superblock.
        wp.set_needs_check(False)
        wp.commit()
        result.actions.append("rewrote both space maps")
