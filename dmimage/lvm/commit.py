"""Write a new VG metadata generation, or a pool superblock's transaction id, crash-safely.

A new generation follows lvm2's vg_write/vg_commit (lib/format_text/format-text.c): the text
(seqno + 1, ending in a NUL) goes into each metadata area's circular buffer after the current
copy, 512-byte aligned, restarting right after the header when fewer than 512 bytes remain;
it may wrap; it must not overlap the committed copy (at most half the buffer minus 512). Only
when the text is on disk in *every* area (flushed) are the headers rewritten, pointing slot 0
at the new text and clearing slot 1, each header's checksum recomputed, flushed again. A crash
before the headers leaves the old generation in force everywhere; a crash between headers
leaves some areas newer, and lvm2 takes the highest seqno that checks.

Both writers hold exclusive locks (``dmimage.devlock``) on the files they write for the whole
write, and refuse to write when the disk no longer holds what the caller read (another writer
committed in between): an API caller that loaded the VG before locking gets an error, never
a lost update. The CLI locks every DISK before it reads anything.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from dmimage import devlock
from dmimage.errors import DeviceError, MetadataError
from dmimage.format.constants import BLOCK_SIZE
from dmimage.format.lvm import (
    MDA_HEADER_FIXED_SIZE,
    MDA_HEADER_SIZE,
    RAW_LOCN_SIZE,
    MdaHeader,
    RawLocn,
    lvm_crc,
)
from dmimage.format.superblock import Superblock
from dmimage.lvm.ondisk import MetadataArea
from dmimage.lvm.text import Section, format_section
from dmimage.lvm.vg import LoadedVG
from dmimage.ordered_write import Write, commit_last

ALIGN = 512


@dataclass
class Placement:
    """Where one area's new text goes (offsets relative to the area)."""

    mda: MetadataArea
    area_size: int
    header: bytes
    start: int
    wrap: int


def _plan(fd: int, mda: MetadataArea, size: int) -> Placement:
    base = mda.region.offset + mda.offset
    hdr = os.pread(fd, MDA_HEADER_SIZE, base)
    h = MdaHeader.parse(hdr[:MDA_HEADER_FIXED_SIZE])
    if lvm_crc(hdr[4:MDA_HEADER_SIZE]) != h.checksum:
        raise MetadataError("header changed since it was read", field=mda.where)
    rl = RawLocn.parse(hdr[MDA_HEADER_FIXED_SIZE:MDA_HEADER_FIXED_SIZE + RAW_LOCN_SIZE])
    if (rl.offset, rl.size, rl.checksum) != (mda.text_offset, mda.text_size,
                                             mda.text_checksum):
        raise MetadataError("the committed text changed since the VG was read (another "
                            "writer committed); nothing was written, read it again",
                            field=mda.where)
    max_size = (h.size - MDA_HEADER_SIZE) // 2 - ALIGN
    if size > max_size:
        raise MetadataError(f"new text of {size} bytes exceeds the area's limit of {max_size}",
                            field=mda.where)
    if rl.offset == 0 and rl.size == 0:
        start, old = MDA_HEADER_SIZE, None
    else:
        old_wrap = max(0, rl.offset + rl.size - h.size)
        old_last = (old_wrap + MDA_HEADER_SIZE - 1) if old_wrap else rl.offset + rl.size - 1
        old = (rl.offset, old_last, old_wrap)
        if h.size - old_last < ALIGN:
            start = MDA_HEADER_SIZE
        else:
            start = -(-(old_last + 1) // ALIGN) * ALIGN
            if start > h.size - ALIGN:
                start = MDA_HEADER_SIZE
    wrap = max(0, start + size - h.size)
    last = (wrap + MDA_HEADER_SIZE - 1) if wrap else start + size - 1
    if old is not None:
        o_start, o_last, o_wrap = old
        if wrap and o_wrap:
            fits = False
        elif not wrap and not o_wrap:
            fits = start > o_last or last < o_start
        elif o_wrap:
            fits = o_last < start < last < o_start
        else:
            fits = last < o_start < o_last < start
        if not fits:
            raise MetadataError("the new text would overlap the committed copy",
                                field=mda.where)
    return Placement(mda, h.size, hdr, start, wrap)


def _header(p: Placement, size: int, checksum: int) -> bytes:
    hdr = bytearray(p.header)
    at = MDA_HEADER_FIXED_SIZE
    old_flags = RawLocn.parse(hdr[at:at + RAW_LOCN_SIZE]).flags
    hdr[at:at + RAW_LOCN_SIZE] = RawLocn.build(
        {"offset": p.start, "size": size, "checksum": checksum, "flags": old_flags})
    hdr[at + RAW_LOCN_SIZE:at + 2 * RAW_LOCN_SIZE] = bytes(RAW_LOCN_SIZE)
    hdr[0:4] = lvm_crc(hdr[4:MDA_HEADER_SIZE]).to_bytes(4, "little")
    return bytes(hdr)


def new_generation_text(tree: Section) -> bytes:
    return format_section(tree).encode("utf-8", errors="surrogateescape") + b"\0"


def write_generation(lvg: LoadedVG, tree: Section) -> list[str]:
    """Write ``tree`` (its seqno already raised) to every metadata area of the VG; returns
    the areas written. Any planning error aborts before a single byte is written."""
    with lvg.lock():
        return _write_generation(lvg, tree)


def _write_generation(lvg: LoadedVG, tree: Section) -> list[str]:
    body_text = new_generation_text(tree)
    checksum = lvm_crc(body_text)
    fds: dict[str, int] = {}
    try:
        for m in lvg.mdas:
            if m.region.path not in fds:
                try:
                    fds[m.region.path] = os.open(m.region.path, os.O_RDWR | os.O_CLOEXEC)
                except OSError as exc:
                    raise DeviceError(f"{m.region.path}: {exc.strerror}") from None
        plans = [_plan(fds[m.region.path], m, len(body_text)) for m in lvg.mdas]
        if not plans:
            raise MetadataError("the VG has no metadata area on the inputs", field=lvg.vg.name)
        body: list[Write] = []
        for p in plans:  # the text, zero-padded to the next sector
            fd, base = fds[p.mda.region.path], p.mda.region.offset + p.mda.offset
            first = len(body_text) - p.wrap
            if p.wrap:
                tail = body_text[first:]
                body += [Write(fd, base + p.start, [memoryview(body_text[:first])]),
                         Write(fd, base + MDA_HEADER_SIZE,
                               [memoryview(tail + bytes(-len(tail) % ALIGN))])]
            else:
                room = p.area_size - (p.start + first)
                body.append(Write(fd, base + p.start,
                                  [memoryview(body_text + bytes(min(-first % ALIGN, room)))]))
        headers = [Write(fds[p.mda.region.path], p.mda.region.offset + p.mda.offset,
                         [memoryview(_header(p, len(body_text), checksum))]) for p in plans]
        commit_last(fds.values(), body, headers)  # the headers last, after every area's text
    except OSError as exc:
        raise DeviceError(f"writing metadata: {exc.strerror}") from None
    finally:
        for fd in fds.values():
            os.close(fd)
    return [p.mda.where for p in plans]


def set_superblock_transaction_id(path: str, offset: int, old: int, new: int) -> None:
    """Rewrite the pool superblock at byte ``offset`` of ``path`` with transaction id ``new``.

    Only the first sector changes (trans_id and the checksum both lie in it), so the write is
    as atomic as a sector write; it is flushed before returning. Holds ``path`` exclusively
    meanwhile; the check of ``old`` under the lock makes a concurrent writer's change an error.
    """
    with devlock.hold(path, exclusive=True):
        _set_superblock_transaction_id(path, offset, old, new)


def _set_superblock_transaction_id(path: str, offset: int, old: int, new: int) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise DeviceError(f"{path}: {exc.strerror}") from None
    try:
        block = bytearray(os.pread(fd, BLOCK_SIZE, offset))
        if len(block) != BLOCK_SIZE:
            raise DeviceError(f"{path}: short read of the pool superblock")
        sb = Superblock.unpack(block)
        if sb.trans_id != old:
            raise MetadataError(f"superblock transaction id is {sb.trans_id}, not {old}",
                                block=0, field="trans_id")
        dataclasses.replace(sb, trans_id=new).pack_into(block)  # seals the block
        # no body: the sector is the commit itself
        commit_last([fd], [], [Write(fd, offset, [memoryview(bytes(block[:512]))])])
    except OSError as exc:
        raise DeviceError(f"{path}: {exc.strerror}") from None
    finally:
        os.close(fd)
