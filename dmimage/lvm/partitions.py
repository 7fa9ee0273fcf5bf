"""Where PVs may live on a disk image: the whole disk and every GPT or MBR partition.

A small reader of its own rather than pyparted: reading needs no libparted (pyparted is only in
the ``image`` extra), works on any file without opening it as a device, and a damaged table
simply yields fewer candidates instead of failing the whole scan. GPT: primary header at LBA 1,
falling back to the backup header in the last sector when the primary's CRC fails (UEFI 2.10
§5.3). MBR: the four primary entries, and logical partitions through the extended chain.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

SECTOR = 512
_GPT_HDR = struct.Struct("<8sIIIIQQQQ16sQIII")
_MBR_ENTRY = struct.Struct("<B3sB3sII")
_EXTENDED_TYPES = {0x05, 0x0F, 0x85}
_PROTECTIVE = 0xEE


@dataclass(frozen=True)
class Region:
    """A byte range of a file that may hold a PV: ``name`` like ``disk.img`` or ``disk.img:p2``."""

    path: str
    name: str
    offset: int
    size: int


def _pread(fd: int, n: int, off: int) -> bytes:
    try:
        return os.pread(fd, n, off)
    except OSError:
        return b""


def _gpt_at(fd: int, lba: int, disk_size: int) -> list[tuple[int, int, int]] | None:
    raw = _pread(fd, SECTOR, lba * SECTOR)
    if len(raw) < _GPT_HDR.size or raw[:8] != b"EFI PART":
        return None
    h = _GPT_HDR.unpack_from(raw)
    hsize, hcrc, entries_lba, n_entries, esize, ecrc = h[2], h[3], h[10], h[11], h[12], h[13]
    if not 92 <= hsize <= SECTOR or esize < 128 or n_entries > 4096:
        return None
    check = bytearray(raw[:hsize])
    struct.pack_into("<I", check, 16, 0)
    if zlib.crc32(check) != hcrc:
        return None
    table = _pread(fd, n_entries * esize, entries_lba * SECTOR)
    if len(table) != n_entries * esize or zlib.crc32(table) != ecrc:
        return None
    parts = []
    for i in range(n_entries):
        e = table[i * esize:(i + 1) * esize]
        if e[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        if last >= first and (last + 1) * SECTOR <= disk_size:
            parts.append((i + 1, first * SECTOR, (last - first + 1) * SECTOR))
    return parts


def _mbr(fd: int, disk_size: int) -> list[tuple[int, int, int]] | None:
    mbr = _pread(fd, SECTOR, 0)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return None
    entries = [_MBR_ENTRY.unpack_from(mbr, 446 + 16 * i) for i in range(4)]
    if any(e[2] == _PROTECTIVE for e in entries):
        return None
    parts: list[tuple[int, int, int]] = []
    for i, (_, _, ptype, _, lba, count) in enumerate(entries):
        if ptype == 0 or count == 0:
            continue
        if ptype in _EXTENDED_TYPES:
            parts.extend(_logical(fd, lba, disk_size))
        elif (lba + count) * SECTOR <= disk_size:
            parts.append((i + 1, lba * SECTOR, count * SECTOR))
    return parts


def _logical(fd: int, ext_lba: int, disk_size: int) -> list[tuple[int, int, int]]:
    parts: list[tuple[int, int, int]] = []
    ebr_lba, number, seen = ext_lba, 5, set()
    while ebr_lba not in seen and len(parts) < 128:
        seen.add(ebr_lba)
        ebr = _pread(fd, SECTOR, ebr_lba * SECTOR)
        if len(ebr) < SECTOR or ebr[510:512] != b"\x55\xaa":
            break
        _, _, ptype, _, lba, count = _MBR_ENTRY.unpack_from(ebr, 446)
        if ptype and count and (ebr_lba + lba + count) * SECTOR <= disk_size:
            parts.append((number, (ebr_lba + lba) * SECTOR, count * SECTOR))
            number += 1
        _, _, ntype, _, nlba, _ = _MBR_ENTRY.unpack_from(ebr, 462)
        if ntype not in _EXTENDED_TYPES or nlba == 0:
            break
        ebr_lba = ext_lba + nlba
    return parts


def regions(path: str, fd: int, disk_size: int) -> list[Region]:
    """The whole file, then each partition of a valid GPT (primary or backup) or MBR."""
    found = [Region(path, path, 0, disk_size)]
    parts = _gpt_at(fd, 1, disk_size)
    if parts is None and disk_size >= 2 * SECTOR:
        parts = _gpt_at(fd, disk_size // SECTOR - 1, disk_size)
    if parts is None:
        parts = _mbr(fd, disk_size)
    for number, off, size in parts or []:
        found.append(Region(path, f"{path}:p{number}", off, size))
    return found
