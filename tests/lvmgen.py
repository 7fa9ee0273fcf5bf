"""LVM2 PVs written byte by byte from the lvm2 sources' facts, independently of dmimage.

Nothing here imports dmimage's LVM code: the label, PV header and mda header are packed with
struct at the offsets lvm2's headers define (lib/label/label.h, lib/format_text/layout.h,
format-text.h), checksums come from a bit-by-bit transcription of lib/misc/crc.c's algorithm
(reflected polynomial 0xedb88320, register started at 0xf597a6cf, no inversion), and the VG
text is written in the shape lvm2's export.c produces. GPT tables follow UEFI 2.10 §5.3.
"""

from __future__ import annotations

import os
import struct
import uuid
import zlib
from dataclasses import dataclass, field

INITIAL_CRC = 0xF597A6CF
MAGIC = b"\x20\x4c\x56\x4d\x32\x20\x78\x5b\x35\x41\x25\x72\x30\x4e\x2a\x3e"


def crc_ref(data: bytes, crc: int = INITIAL_CRC) -> int:
    """lvm2's calc_crc, one bit at a time."""
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc


def label_sector(pv_uuid: bytes, dev_size: int, data_areas: list[tuple[int, int]],
                 mdas: list[tuple[int, int]], sector: int = 1) -> bytes:
    buf = bytearray(512)
    buf[0:8] = b"LABELONE"
    struct.pack_into("<Q", buf, 8, sector)
    struct.pack_into("<I", buf, 20, 32)
    buf[24:32] = b"LVM2 001"
    buf[32:64] = pv_uuid
    struct.pack_into("<Q", buf, 64, dev_size)
    pos = 72
    for lst in (data_areas, mdas):
        for off, size in [*lst, (0, 0)]:
            struct.pack_into("<QQ", buf, pos, off, size)
            pos += 16
    struct.pack_into("<II", buf, pos, 2, 1)  # extension version 2, flag PV_EXT_USED
    struct.pack_into("<I", buf, 16, crc_ref(bytes(buf[20:])))
    return bytes(buf)


def mda_header(start: int, size: int, rlocns: list[tuple[int, int, int, int]]) -> bytes:
    buf = bytearray(512)
    buf[4:20] = MAGIC
    struct.pack_into("<IQQ", buf, 20, 1, start, size)
    pos = 40
    for r in [*rlocns, (0, 0, 0, 0)]:
        struct.pack_into("<QQII", buf, pos, *r)
        pos += 24
    struct.pack_into("<I", buf, 0, crc_ref(bytes(buf[4:])))
    return bytes(buf)


def write_pv(f, region_off: int, pv_uuid: str, dev_size: int, pe_start: int, text: str,
             mda_off: int = 4096, mda_size: int = 64 * 1024, text_off: int = 512,
             second_mda: tuple[int, int, str] | None = None) -> None:
    """A PV at ``region_off``: label in sector 1, one metadata area (two with second_mda),
    text at ``text_off`` in the area's circular buffer (wrapping past its end if needed)."""
    raw = pv_uuid.replace("-", "").encode()
    assert len(raw) == 32
    mdas = [(mda_off, mda_size)] + ([second_mda[:2]] if second_mda else [])
    f.seek(region_off + 512)
    f.write(label_sector(raw, dev_size, [(pe_start, 0)], mdas))
    for (off, size), t, toff in [((mda_off, mda_size), text, text_off)] + (
            [((second_mda[0], second_mda[1]), second_mda[2], 512)] if second_mda else []):
        body = t.encode() + b"\0"
        first = min(len(body), size - toff)
        f.seek(region_off + off + toff)
        f.write(body[:first])
        if first < len(body):
            f.seek(region_off + off + 512)
            f.write(body[first:])
        f.seek(region_off + off)
        f.write(mda_header(off, size, [(toff, len(body), crc_ref(body), 0)]))


def write_gpt(f, disk_size: int, parts: list[tuple[int, int]]) -> None:
    """Protective MBR, primary GPT (header + 128 entries) for [(first_lba, last_lba)]."""
    mbr = bytearray(512)
    struct.pack_into("<B3sB3sII", mbr, 446, 0, b"\0\0\2", 0xEE, b"\xff\xff\xff", 1,
                     min(disk_size // 512 - 1, 0xFFFFFFFF))
    mbr[510:512] = b"\x55\xaa"
    table = bytearray(128 * 128)
    linux = uuid.UUID("e6d6d379-f507-44c2-a23c-238f2a3df928").bytes_le  # Linux LVM
    for i, (first, last) in enumerate(parts):
        e = 128 * i
        table[e:e + 16] = linux
        table[e + 16:e + 32] = uuid.UUID(int=i + 1).bytes_le
        struct.pack_into("<QQ", table, e + 32, first, last)
    last_lba = disk_size // 512 - 1
    hdr = bytearray(struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, 1,
                                last_lba, 34, last_lba - 33, uuid.UUID(int=7).bytes_le, 2,
                                128, 128, zlib.crc32(table)))
    struct.pack_into("<I", hdr, 16, zlib.crc32(hdr))
    f.seek(0)
    f.write(mbr)
    f.write(hdr + bytes(512 - len(hdr)))
    f.write(table)


def q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class TLv:
    name: str
    segments: list[str]  # segment bodies (lines without indentation)
    visible: bool = True
    extra_status: list[str] = field(default_factory=list)


def vg_text(name: str, vg_id: str, seqno: int, extent_size: int,
            pvs: list[tuple[str, str, int, int, int]], lvs: list[TLv]) -> str:
    """VG text as lvm2's raw export writes it; pvs = (pvN, id, dev_size, pe_start, pe_count)."""
    out = [f"{name} {{", f"id = {q(vg_id)}", f"seqno = {seqno}", 'format = "lvm2"',
           'status = ["RESIZEABLE", "READ", "WRITE"]', "flags = []",
           f"extent_size = {extent_size}", "max_lv = 0", "max_pv = 0", "metadata_copies = 0",
           "", "physical_volumes {", ""]
    for pvn, pid, dev_size, pe_start, pe_count in pvs:
        out += [f"{pvn} {{", f"id = {q(pid)}", f'device = "/dev/{pvn}"', "",
                'status = ["ALLOCATABLE"]', "flags = []", f"dev_size = {dev_size}",
                f"pe_start = {pe_start}", f"pe_count = {pe_count}", "}"]
    out += ["}", "", "logical_volumes {", ""]
    for i, lv in enumerate(lvs):
        status = ["READ", "WRITE"] + lv.extra_status + (["VISIBLE"] if lv.visible else [])
        out += [f"{lv.name} {{", f'id = "{i:06d}-aaaa-bbbb-cccc-dddd-eeee-ffffff"',
                "status = [" + ", ".join(q(s) for s in status) + "]", "flags = []",
                'creation_time = 1700000000\t# 2023-11-14', 'creation_host = "guest"',
                f"segment_count = {len(lv.segments)}", ""]
        for j, body in enumerate(lv.segments):
            out += [f"segment{j + 1} {{", *body.splitlines(), "}"]
        out += ["}"]
    out += ["}", "}", "# Generated by LVM2 version 2.03.16(2) (2022-05-18): Tue Dec  1 2026",
            "", 'contents = "Text Format Volume Group"', "version = 1", "",
            'description = ""', "", 'creation_host = "guest"\t# Linux guest',
            "creation_time = 1700000000\t# Tue Nov 14 2023", ""]
    return "\n".join(out)


def striped(start: int, count: int, stripes: list[tuple[str, int]], stripe_size: int = 0) -> str:
    lines = [f"start_extent = {start}", f"extent_count = {count}", "", 'type = "striped"',
             f"stripe_count = {len(stripes)}"]
    if len(stripes) > 1:
        lines.append(f"stripe_size = {stripe_size}\t# {stripe_size // 2} Kilobytes")
    lines += ["", "stripes = [", ",\n".join(f'"{p}", {e}' for p, e in stripes), "]"]
    return "\n".join(lines)


def blank(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def fill_random(path: str, off: int, n: int, seed: int) -> None:
    import random
    rnd = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, rnd.randbytes(n), off)
    finally:
        os.close(fd)
