"""Delete orphan thins (pool devices no LV names) from a pool inside a VG, offline.

The pool's metadata is copied out of ``_tmeta`` into a temporary file and the deletes run
through the existing offline writer (thin/transaction.py: copy-on-write, superblock last).
The blocks that changed are then written back into the ``_tmeta`` extents: every other block
first (the writer only wrote blocks that were free in the committed metadata), a flush, then
block 0, then a flush; a crash before block 0 leaves the old metadata in force. The VG
metadata does not change: it never named the orphans. The VG's PVs are held exclusively
(shared on --dry-run) from the check of the pool to the write-back, so no other writer's
commit falls in between and is overwritten.
"""

from __future__ import annotations

import os
import tempfile

from dmimage.errors import DeviceError, UsageError
from dmimage.format.constants import BLOCK_SIZE
from dmimage.lvm.check import LvmReport, check_pool
from dmimage.lvm.model import LogicalVolume
from dmimage.lvm.thin import pool_segment, sub_lv
from dmimage.lvm.vg import LoadedVG
from dmimage.lvm.view import LvView
from dmimage.ordered_write import Write, commit_last, pwrite_all
from dmimage.thin.transaction import open_writable

_CHUNK = 4 << 20


def _write_back(tmeta: LvView, changed: dict[int, bytes], where: str) -> None:
    """Changed blocks into the LV's extents: all but block 0, flush, block 0, flush."""
    fds: dict[str, int] = {}

    def writes(b: int) -> list[Write]:
        out, done = [], 0
        for path, start, length in tmeta.extents(b * BLOCK_SIZE, BLOCK_SIZE):
            if path not in fds:
                fds[path] = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            out.append(Write(fds[path], start,
                             [memoryview(changed[b][done:done + length])]))
            done += length
        return out

    try:
        body = [w for b in sorted(changed) if b for w in writes(b)]
        commit = writes(0) if 0 in changed else []
        commit_last(fds.values(), body, commit)
    except OSError as exc:
        raise DeviceError(f"writing {where} metadata: {exc.strerror}") from None
    finally:
        for f in fds.values():
            os.close(f)


def delete_orphans(lvg: LoadedVG, pool_lv: LogicalVolume, *, dry_run: bool) -> list[str]:
    with lvg.lock(exclusive=not dry_run):
        return _delete_orphans(lvg, pool_lv, dry_run=dry_run)


def _delete_orphans(lvg: LoadedVG, pool_lv: LogicalVolume, *, dry_run: bool) -> list[str]:
    seg = pool_segment(pool_lv)
    where = f"{lvg.vg.name}/{pool_lv.name}"
    report = LvmReport()
    check_pool(lvg, pool_lv.name, report)
    state = report.pools[-1]
    if state.sb_transaction_id is None:
        raise UsageError(f"{where}: pool metadata does not check ("
                         + "; ".join(report.problems[:1]) + "); repair it first")
    if not state.orphans:
        return [f"{where}: no orphan thins"]
    lines = [f"{where}: delete orphan thin device {d}" for d in state.orphans]
    if dry_run:
        return [line + " [dry run]" for line in lines]
    with LvView(lvg, sub_lv(lvg, seg.metadata, pool_lv.name)) as tmeta:
        fd, tmp = tempfile.mkstemp(prefix="dmimage-tmeta-")
        try:
            for off in range(0, tmeta.size, _CHUNK):
                pwrite_all(fd, [memoryview(tmeta.pread(min(_CHUNK, tmeta.size - off), off))],
                           off)
            os.close(fd)
            fd = -1
            with open_writable(tmp) as wp:
                for dev in state.orphans:
                    wp.delete(dev)
                wp.commit()
            changed: dict[int, bytes] = {}
            with open(tmp, "rb") as f:
                for off in range(0, tmeta.size, _CHUNK):
                    new = f.read(_CHUNK)
                    old = tmeta.pread(len(new), off)
                    for i in range(0, len(new), BLOCK_SIZE):
                        if new[i:i + BLOCK_SIZE] != old[i:i + BLOCK_SIZE]:
                            changed[(off + i) // BLOCK_SIZE] = new[i:i + BLOCK_SIZE]
        finally:
            if fd >= 0:
                os.close(fd)
            os.unlink(tmp)
        _write_back(tmeta, changed, where)
    blocks = changed
    return lines + [f"  {len(blocks)} metadata blocks rewritten, block 0 last"]
