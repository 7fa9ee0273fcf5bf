"""Repairing thin-pool metadata: in-place fixes (leaks, nr_allocated, NEEDS_CHECK) and
salvage of damaged metadata into a fresh pool (``dmimage repair``, ``dmimage dump --repair``).

In-place fixes (:func:`fix_in_place`, what ``dmimage check --auto-repair`` and
``--clear-needs-check-flag`` do) only ever touch metadata that checks clean apart from
non-fatal problems:

* clearing NEEDS_CHECK alone rewrites block 0 only, with the same bytes except the flags and
  the checksum: the kernel's own commit point, a single-sector write;
* fixing leaked blocks or a wrong nr_allocated goes through :class:`WritablePool`: both space
  maps are written afresh to blocks that the committed state does not use (leaked blocks
  included), flushed, and the superblock is written last and flushed again. A crash leaves
  either the old or the repaired pool.

Salvage (:func:`salvage` -> IR, :func:`repair` -> new metadata file) reads the input read-only
and never writes it. See docs/repair.md for the strategy and how it compares with thin_repair
1.1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from dmimage.errors import DeviceError, MetadataError, UsageError
from dmimage.format.checksum import seal
from dmimage.format.constants import BLOCK_SIZE, NEEDS_CHECK_FLAG, SALT_SUPERBLOCK
from dmimage.pdata.block import BlockReader
from dmimage.thin.check import CheckReport, check_metadata
from dmimage.thin.superblock import read_superblock

__all__ = [
    "FixResult", "fix_in_place", "clear_needs_check",
    "Overrides", "SalvageReport", "salvage", "repair", "RepairResult",
]


# ============================================================================ in-place fixes


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


def _needs_check(path: str | os.PathLike[str]) -> bool:
    try:
        with BlockReader(path) as reader:
            return read_superblock(reader, 0).needs_check
    except MetadataError:
        return False


def clear_needs_check(path: str | os.PathLike[str]) -> bool:
    """Clear NEEDS_CHECK by rewriting block 0 alone (flags and checksum change, nothing else).

    Returns False if the flag was not set. The caller decides whether the pool deserves it.
    """
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DeviceError(f"{p}: cannot open for writing: {exc.strerror}") from None
    try:
        block = bytearray(os.pread(fd, BLOCK_SIZE, 0))
        if len(block) != BLOCK_SIZE:
            raise MetadataError("too short to hold a superblock", block=0)
        flags = int.from_bytes(block[4:8], "little")
        if not flags & NEEDS_CHECK_FLAG:
            return False
        block[4:8] = (flags & ~NEEDS_CHECK_FLAG).to_bytes(4, "little")
        seal(block, SALT_SUPERBLOCK)
        try:
            if os.pwrite(fd, bytes(block), 0) != BLOCK_SIZE:
                raise DeviceError(f"{p}: short write of the superblock")
            os.fsync(fd)
        except OSError as exc:
            raise DeviceError(f"{p}: writing the superblock failed: {exc.strerror}") from None
        return True
    finally:
        os.close(fd)


def _only_repairable(report: CheckReport) -> bool:
    """True when every problem is one --auto-repair may fix (leaks, nr_allocated)."""
    return report.ok(ignore_non_fatal=True)


def fix_in_place(path: str | os.PathLike[str], *, auto_repair: bool = False,
                 clear_needs_check_flag: bool = False,
                 ignore_non_fatal: bool = False) -> FixResult:
    """Check ``path`` and, if allowed and safe, fix it in place (thin_check's options).

    * ``auto_repair``: free leaked metadata and data blocks, recompute both nr_allocated, and
      clear NEEDS_CHECK -- only when no fatal problem exists.
    * ``clear_needs_check_flag``: clear NEEDS_CHECK when the check passes (with
      ``ignore_non_fatal``: passes apart from non-fatal problems).

    Fatal damage is never written to: the result then just carries the report.
    """
    before = check_metadata(path)
    result = FixResult(before, before)
    if not before.ok(ignore_non_fatal=True):
        return result  # fatal damage: leave it to `dmimage repair`
    needs_check = _needs_check(path)
    repairable = [p for p in before.problems if not p.fatal]
    if auto_repair and repairable:
        _rewrite_space_maps(path, before, result)
        result.cleared_needs_check = needs_check
        result.written = True
    elif (auto_repair or (clear_needs_check_flag and before.ok(ignore_non_fatal)))\
            and needs_check:
        result.cleared_needs_check = clear_needs_check(path)
        result.written = result.cleared_needs_check
        if result.cleared_needs_check:
            result.actions.append("cleared NEEDS_CHECK")
    if result.written:
        result.after = check_metadata(path)
    return result


def _rewrite_space_maps(path: str | os.PathLike[str], report: CheckReport,
                        result: FixResult) -> None:
    from dmimage.thin.transaction import WritablePool

    with WritablePool(path) as wp:
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
