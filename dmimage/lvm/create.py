"""Write a new PV (label, PV header, one metadata area with its first text) and the VG text
of a thin-pool layout, as pvcreate/vgcreate/lvcreate would leave them.

Layout of the PV (lvm2's defaults): label in sector 1, a metadata area from byte 4096 to
``pe_start``, extents from ``pe_start`` (1 MiB). The text is the first generation: it starts
right after the area's 512-byte header; the header's slot 0 points at it, slot 1 is empty.
"""

from __future__ import annotations

from dataclasses import dataclass

from dmimage.format.lvm import (
    LABEL_HEADER_SIZE,
    LABEL_ID,
    LABEL_SIZE,
    LABEL_TYPE,
    MDA_HEADER_SIZE,
    MDA_MAGIC,
    MDA_VERSION,
    DiskLocn,
    LabelHeader,
    MdaHeader,
    PvHeader,
    PvHeaderExtension,
    RawLocn,
    lvm_crc,
)
from dmimage.lvm.model import (
    LogicalVolume,
    PhysicalVolume,
    StripedSegment,
    ThinPoolSegment,
    ThinSegment,
    VolumeGroup,
)
from dmimage.lvm.text import Section, format_section
from dmimage.ordered_write import Write, commit_last

SECTOR = 512
MDA_OFFSET = 4096
PE_START = 1 << 20
_ID_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def make_id(seed: bytes) -> str:
    """A 32-character lvm2 id (alphanumerics, lib/id/id.c) from ``seed``, in printed form."""
    import hashlib

    raw = hashlib.sha256(seed).digest()
    s = "".join(_ID_CHARS[b % 62] for b in raw[:32])
    cuts = (0, 6, 10, 14, 18, 22, 26, 32)
    return "-".join(s[a:b] for a, b in zip(cuts, cuts[1:], strict=False))


def label_sector(pv_id: str, dev_size: int, pe_start: int, mda: tuple[int, int]) -> bytes:
    """Sector 1 of a new PV: label header, PV header, area lists, extension (version 2)."""
    buf = bytearray(LABEL_SIZE)
    body = PvHeader.build({"uuid": pv_id.replace("-", "").encode(), "device_size": dev_size})
    for off, size in ((pe_start, 0), (0, 0), mda, (0, 0)):
        body += DiskLocn.build({"offset": off, "size": size})
    body += PvHeaderExtension.build({"version": 2, "flags": 1})  # PV_EXT_USED
    body += DiskLocn.build({"offset": 0, "size": 0})  # no bootloader areas
    buf[LABEL_HEADER_SIZE:LABEL_HEADER_SIZE + len(body)] = body
    head = LabelHeader.build({"id": LABEL_ID, "sector": 1, "crc": 0,
                              "offset": LABEL_HEADER_SIZE, "type": LABEL_TYPE})
    buf[:LABEL_HEADER_SIZE] = head
    crc = lvm_crc(buf[20:])
    buf[16:20] = crc.to_bytes(4, "little")
    return bytes(buf)


def mda_header(area_offset: int, area_size: int, text: bytes) -> bytes:
    hdr = bytearray(MDA_HEADER_SIZE)
    fixed = MdaHeader.build({"checksum": 0, "magic": MDA_MAGIC, "version": MDA_VERSION,
                             "start": area_offset, "size": area_size})
    hdr[:len(fixed)] = fixed
    rl = RawLocn.build({"offset": MDA_HEADER_SIZE, "size": len(text),
                        "checksum": lvm_crc(text), "flags": 0})
    hdr[len(fixed):len(fixed) + len(rl)] = rl
    hdr[0:4] = lvm_crc(hdr[4:]).to_bytes(4, "little")
    return bytes(hdr)


def write_pv(fd: int, region_offset: int, region_size: int, pv_id: str, text: bytes) -> None:
    """Label and metadata area of a new PV at ``region_offset`` of ``fd`` (text ends in NUL);
    extents start at PE_START. The header goes last, after the text is flushed."""
    area = (MDA_OFFSET, PE_START - MDA_OFFSET)
    if len(text) > (area[1] - MDA_HEADER_SIZE) // 2 - 512:
        raise ValueError(f"VG text of {len(text)} bytes does not fit the metadata area")
    commit_last([fd], [Write(fd, region_offset + MDA_OFFSET + MDA_HEADER_SIZE,
                             [memoryview(text)]),
                       Write(fd, region_offset + SECTOR,
                             [memoryview(label_sector(pv_id, region_size, PE_START, area))])],
                [Write(fd, region_offset + MDA_OFFSET, [memoryview(mda_header(*area, text))])])


@dataclass
class ThinSpec:
    name: str
    device_id: int
    size: int  # bytes, a multiple of the extent size
    origin: str | None


def thin_pool_vg(*, vg: str, seed: bytes, extent_size: int, region_size: int, pool: str,
                 tmeta_size: int, tdata_size: int, chunk_sectors: int, transaction_id: int,
                 thins: list[ThinSpec], creation_time: int, pmspare_size: int | None = None,
                 linear: list[tuple[str, int]] | None = None) -> tuple[VolumeGroup, str]:
    """The VG (pmspare, tmeta, tdata as lvcreate --type thin-pool lays them out, the
    thins, then the ``linear`` (name, size) LVs, allocated after the pool's) and the PV's id.
    Sizes in bytes, multiples of ``extent_size``; the spare defaults to the tmeta's size."""
    ext = extent_size
    pe_count = (region_size - PE_START) // ext
    pv_id = make_id(seed + b"\0pv0")
    lvs: list[LogicalVolume] = []
    pe = 0

    def extents_lv(name: str, size: int) -> LogicalVolume:
        nonlocal pe
        count = size // ext
        seg = StripedSegment("segment1", 0, count, "striped", Section(), None, [("pv0", pe)])
        pe += count
        return LogicalVolume(name, make_id(seed + name.encode()), ["READ", "WRITE"], [seg],
                             [], Section(creation_time=creation_time,
                                         creation_host="dmimage"))

    lvs.append(extents_lv("lvol0_pmspare", tmeta_size if pmspare_size is None else pmspare_size))
    lvs.append(extents_lv(f"{pool}_tmeta", tmeta_size))
    lvs.append(extents_lv(f"{pool}_tdata", tdata_size))
    plain = [extents_lv(name, size) for name, size in linear or []]
    for lv in plain:
        lv.status.append("VISIBLE")
    if pe > pe_count:
        raise ValueError(f"{pe} extents needed, the PV has {pe_count}")
    extra = Section(creation_time=creation_time, creation_host="dmimage")
    pseg = ThinPoolSegment("segment1", 0, tdata_size // ext, "thin-pool", Section(),
                           f"{pool}_tmeta", f"{pool}_tdata", transaction_id, chunk_sectors,
                           "passdown", 1)
    lvs.insert(0, LogicalVolume(pool, make_id(seed + b"\0pool"), ["READ", "WRITE", "VISIBLE"],
                                [pseg], [], Section(extra)))
    for t in thins:
        seg = ThinSegment("segment1", 0, t.size // ext, "thin", Section(), pool,
                          transaction_id, t.device_id, t.origin, None, None)
        status = ["READ", "WRITE", "VISIBLE"]
        lvs.append(LogicalVolume(t.name, make_id(seed + b"\0thin" + t.name.encode()), status,
                                 [seg], [], Section(extra)))
    lvs.extend(plain)
    pv = PhysicalVolume("pv0", pv_id, "/dev/vda1", ["ALLOCATABLE"], region_size // SECTOR,
                        PE_START // SECTOR, pe_count)
    group = VolumeGroup(vg, make_id(seed + b"\0vg"), 1, ext // SECTOR,
                        ["RESIZEABLE", "READ", "WRITE"], [pv], lvs, [], "lvm2",
                        Section(max_lv=0, max_pv=0, metadata_copies=0),
                        Section(contents="Text Format Volume Group", version=1,
                                description="Written by dmimage build",
                                creation_host="dmimage", creation_time=creation_time))
    return group, pv_id


def vg_text(group: VolumeGroup) -> bytes:
    return format_section(group.to_tree()).encode() + b"\0"
