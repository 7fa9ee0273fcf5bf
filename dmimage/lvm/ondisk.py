"""Find PV labels on disk images and read their metadata areas (read-only).

For every region (whole file, each partition) the first four sectors are searched for a
label; a label that fails any check is reported and skipped, as lvm2 skips it. Each metadata
area's header is checked (checksum, magic, version, start, size) and the committed text
(raw_locn slot 0) is read through the circular buffer: text running past the end of the area
continues right after the 512-byte header. Its checksum is lvm2's CRC chained over both parts.
A precommitted text (slot 1, left when vg_precommit was not followed by vg_commit) is read the
same way and kept for check to report; lvm2's readers, and ours, use slot 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from dmimage.errors import DeviceError
from dmimage.format.lvm import (
    DISK_LOCN_SIZE,
    LABEL_CRC_START,
    LABEL_HEADER_SIZE,
    LABEL_ID,
    LABEL_SCAN_SECTORS,
    LABEL_SIZE,
    LABEL_TYPE,
    MDA_HEADER_FIXED_SIZE,
    MDA_HEADER_SIZE,
    MDA_MAGIC,
    MDA_VERSION,
    PV_HEADER_SIZE,
    RAW_LOCN_IGNORED,
    RAW_LOCN_SIZE,
    SECTOR_SIZE,
    DiskLocn,
    LabelHeader,
    MdaHeader,
    PvHeader,
    RawLocn,
    lvm_crc,
)
from dmimage.lvm.partitions import Region, regions
from dmimage.pdata.block import device_size


def format_uuid(raw: bytes) -> str:
    """lvm2's printed form of a 32-character id: 6-4-4-4-4-4-6 groups."""
    s = raw.decode("ascii", errors="replace")
    cuts = (0, 6, 10, 14, 18, 22, 26, 32)
    return "-".join(s[a:b] for a, b in zip(cuts, cuts[1:], strict=False))


@dataclass
class MetadataArea:
    """One metadata area of a PV: where it is, what its header says, the committed text."""

    region: Region
    offset: int  # bytes from the region's start (disk_locn.offset)
    size: int
    problems: list[str] = field(default_factory=list)
    ignored: bool = False
    empty: bool = False  # no metadata committed (a PV outside any VG)
    text: bytes | None = None
    text_offset: int = 0  # raw_locn.offset, relative to the area
    text_size: int = 0  # raw_locn.size, including the terminating NUL
    text_checksum: int = 0
    wraps: bool = False
    #: raw_locn slot 1: text lvm2's vg_precommit pointed at and no vg_commit followed (a
    #: crash in between, or an interrupted suspend); lvm2's readers use slot 0.
    precommitted: bytes | None = None
    precommitted_problem: str | None = None

    @property
    def where(self) -> str:
        return f"{self.region.name}: metadata area at byte {self.offset}"


@dataclass
class PvLabel:
    """A PV label found on a region, with its header's lists and metadata areas."""

    region: Region
    sector: int
    uuid: str
    device_size: int  # bytes, as the PV header records it
    data_areas: list[tuple[int, int]]
    mdas: list[MetadataArea]
    ext_version: int | None = None
    ext_flags: int | None = None


@dataclass
class ScanResult:
    labels: list[PvLabel] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _read(fd: int, off: int, n: int, what: str) -> bytes:
    try:
        b = os.pread(fd, n, off)
    except OSError as exc:
        raise DeviceError(f"{what}: {exc.strerror}") from None
    return b


def _locns(buf: bytes, pos: int, end: int) -> tuple[list[tuple[int, int]], int] | None:
    """A disk_locn list from ``pos``, ended by offset 0; None if it runs past ``end``."""
    out: list[tuple[int, int]] = []
    while True:
        if pos + DISK_LOCN_SIZE > end:
            return None
        d = DiskLocn.parse(buf[pos:pos + DISK_LOCN_SIZE])
        pos += DISK_LOCN_SIZE
        if d.offset == 0:
            return out, pos
        out.append((d.offset, d.size))


def check_label_sector(sector_buf: bytes, sector: int) -> str | None:
    """Why this sector's LABELONE label is not valid, or None."""
    lh = LabelHeader.parse(sector_buf[:LABEL_HEADER_SIZE])
    if lh.sector != sector:
        return f"label at sector {sector} says sector {lh.sector}"
    crc = lvm_crc(sector_buf[LABEL_CRC_START:LABEL_SIZE])
    if crc != lh.crc:
        return f"label at sector {sector}: crc {lh.crc:#010x}, computed {crc:#010x}"
    if lh.type != LABEL_TYPE:
        return f"label at sector {sector}: type {lh.type!r}, expected {LABEL_TYPE!r}"
    if not LABEL_HEADER_SIZE <= lh.offset <= LABEL_SIZE - PV_HEADER_SIZE:
        return f"label at sector {sector}: pv_header offset {lh.offset} outside the sector"
    return None


def read_label(fd: int, region: Region, problems: list[str]) -> PvLabel | None:
    """The valid PV label of a region, if any; damaged labels go to ``problems``."""
    if region.size < LABEL_SCAN_SECTORS * SECTOR_SIZE:
        return None
    head = _read(fd, region.offset, LABEL_SCAN_SECTORS * SECTOR_SIZE, region.name)
    for sector in range(LABEL_SCAN_SECTORS):
        buf = head[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE]
        if len(buf) < SECTOR_SIZE or buf[:8] != LABEL_ID:
            continue
        why = check_label_sector(buf, sector)
        if why:
            problems.append(f"{region.name}: {why}")
            continue
        off = LabelHeader.parse(buf[:LABEL_HEADER_SIZE]).offset
        pvh = PvHeader.parse(buf[off:off + PV_HEADER_SIZE])
        das = _locns(buf, off + PV_HEADER_SIZE, SECTOR_SIZE)
        mdl = None if das is None else _locns(buf, das[1], SECTOR_SIZE)
        if das is None or mdl is None:
            problems.append(f"{region.name}: pv_header at sector {sector}: area lists run past "
                            "the label sector")
            continue
        ext_version = ext_flags = None
        if mdl[1] + 8 <= SECTOR_SIZE:
            ext_version = int.from_bytes(buf[mdl[1]:mdl[1] + 4], "little")
            ext_flags = int.from_bytes(buf[mdl[1] + 4:mdl[1] + 8], "little")
        mdas = [read_mda(fd, region, o, s) for o, s in mdl[0]]
        return PvLabel(region, sector, format_uuid(pvh.uuid), pvh.device_size, das[0], mdas,
                       ext_version, ext_flags)
    return None


def read_mda(fd: int, region: Region, offset: int, size: int) -> MetadataArea:
    """Check one metadata area's header and read its committed text (``text`` None if bad)."""
    mda = MetadataArea(region, offset, size)
    if offset + MDA_HEADER_SIZE > region.size or size < MDA_HEADER_SIZE:
        mda.problems.append(f"{mda.where}: area of {size} bytes lies outside the device "
                            f"({region.size} bytes)")
        return mda
    base = region.offset + offset
    hdr = _read(fd, base, MDA_HEADER_SIZE, region.name)
    if len(hdr) < MDA_HEADER_SIZE:
        mda.problems.append(f"{mda.where}: short read of the header")
        return mda
    h = MdaHeader.parse(hdr[:MDA_HEADER_FIXED_SIZE])
    crc = lvm_crc(hdr[4:MDA_HEADER_SIZE])
    if crc != h.checksum:
        mda.problems.append(f"{mda.where}: mda_header checksum {h.checksum:#010x}, computed "
                            f"{crc:#010x}")
    if h.magic != MDA_MAGIC:
        mda.problems.append(f"{mda.where}: mda_header magic {h.magic!r} is wrong")
    if h.version != MDA_VERSION:
        mda.problems.append(f"{mda.where}: mda_header version {h.version}, expected 1")
    if h.start != offset:
        mda.problems.append(f"{mda.where}: mda_header start {h.start}, expected {offset}")
    if h.size < MDA_HEADER_SIZE or offset + h.size > region.size:
        mda.problems.append(f"{mda.where}: mda_header size {h.size} is impossible")
    if mda.problems:
        return mda
    rl = RawLocn.parse(hdr[MDA_HEADER_FIXED_SIZE:MDA_HEADER_FIXED_SIZE + RAW_LOCN_SIZE])
    if rl.flags & RAW_LOCN_IGNORED:
        mda.ignored = True
        return mda
    if rl.offset == 0 and rl.size == 0:
        mda.empty = True
        return mda
    mda.text_offset, mda.text_size, mda.text_checksum = rl.offset, rl.size, rl.checksum
    text, why, wraps = _read_text(fd, region, base, h.size, rl)
    if why is not None:
        mda.problems.append(f"{mda.where}: {why}")
        return mda
    mda.wraps, mda.text = wraps, text
    at = MDA_HEADER_FIXED_SIZE + RAW_LOCN_SIZE
    pre = RawLocn.parse(hdr[at:at + RAW_LOCN_SIZE])
    if pre.size and pre.offset != rl.offset:  # lvm2 honours slot 1 only when it differs
        mda.precommitted, why, _ = _read_text(fd, region, base, h.size, pre)
        mda.precommitted_problem = why
    return mda


def _read_text(fd: int, region: Region, base: int, area_size: int, rl: Any
               ) -> tuple[bytes | None, str | None, bool]:
    """The text a raw_locn points at, through the circular buffer: (text, problem, wraps)."""
    if (rl.offset < MDA_HEADER_SIZE or rl.offset >= area_size
            or rl.size > area_size - MDA_HEADER_SIZE or rl.size == 0):
        return None, (f"raw_locn offset {rl.offset} size {rl.size} lies outside the area of "
                      f"{area_size} bytes"), False
    wrap = max(0, rl.offset + rl.size - area_size)
    first = _read(fd, base + rl.offset, rl.size - wrap, region.name)
    second = _read(fd, base + MDA_HEADER_SIZE, wrap, region.name) if wrap else b""
    if len(first) + len(second) != rl.size:
        return None, "metadata text runs past the end of the file", False
    crc = lvm_crc(second, lvm_crc(first))
    if crc != rl.checksum:
        return None, (f"metadata text checksum {rl.checksum:#010x}, computed "
                      f"{crc:#010x}"), False
    return first + second, None, bool(wrap)


def scan(paths: list[str]) -> ScanResult:
    """Every valid PV label on the given files (whole file and each partition)."""
    result = ScanResult()
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DeviceError(f"{path}: {exc.strerror}") from None
        try:
            try:
                size = device_size(fd)
            except DeviceError as exc:
                raise DeviceError(f"{path}: {exc}") from None
            for region in regions(path, fd, size):
                label = read_label(fd, region, result.problems)
                if label is not None:
                    result.labels.append(label)
        finally:
            os.close(fd)
    return result
