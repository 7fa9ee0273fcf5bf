"""On-disk layouts of LVM2 physical volumes: label, PV header, metadata-area header.

Facts from lvm2 (lib/label/label.h, lib/format_text/layout.h, format-text.h, lib/misc/crc.c):
- the label is one 512-byte sector among the first four of a PV; its crc covers the sector from
  ``offset`` (byte 20) to the end;
- the PV header follows at ``label.offset``: uuid, device size, then two lists of disk_locn
  (data areas, then metadata areas), each ended by an entry whose offset is 0;
- a metadata area starts with a 512-byte mda_header whose checksum covers bytes 4..511; its
  raw_locn list (slot 0 committed, slot 1 precommitted) points into the circular text buffer
  that fills the rest of the area;
- every checksum is lvm2's calc_crc: the reflected CRC-32 (polynomial 0xedb88320) started at
  0xf597a6cf, without zlib's pre- and post-inversion.
All integers are little-endian.
"""

from __future__ import annotations

import zlib

from construct import Bytes, Int32ul, Int64ul, Struct

SECTOR_SIZE = 512
LABEL_SIZE = 512
#: lvm2 scans sectors 0..3 for the label.
LABEL_SCAN_SECTORS = 4
LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
#: label_header.crc covers the sector from the offset field (byte 20) to its end.
LABEL_CRC_START = 20
MDA_HEADER_SIZE = 512
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_VERSION = 1
#: raw_locn.flags bit: this metadata area is ignored (metadataignore).
RAW_LOCN_IGNORED = 0x1
INITIAL_CRC = 0xF597A6CF
ID_LEN = 32

LabelHeader = Struct(
    "id" / Bytes(8),
    "sector" / Int64ul,
    "crc" / Int32ul,
    "offset" / Int32ul,
    "type" / Bytes(8),
)

DiskLocn = Struct(
    "offset" / Int64ul,
    "size" / Int64ul,
)

#: Fixed part of pv_header; the disk_locn lists follow.
PvHeader = Struct(
    "uuid" / Bytes(ID_LEN),
    "device_size" / Int64ul,
)

#: Version and flags of the extension that follows the metadata-area list (lvm2 >= 2.02.110).
PvHeaderExtension = Struct(
    "version" / Int32ul,
    "flags" / Int32ul,
)

RawLocn = Struct(
    "offset" / Int64ul,
    "size" / Int64ul,
    "checksum" / Int32ul,
    "flags" / Int32ul,
)

#: Fixed part of mda_header; the raw_locn list follows at byte 40.
MdaHeader = Struct(
    "checksum" / Int32ul,
    "magic" / Bytes(16),
    "version" / Int32ul,
    "start" / Int64ul,
    "size" / Int64ul,
)

LABEL_HEADER_SIZE = LabelHeader.sizeof()  # 32
PV_HEADER_SIZE = PvHeader.sizeof()  # 40
DISK_LOCN_SIZE = DiskLocn.sizeof()  # 16
RAW_LOCN_SIZE = RawLocn.sizeof()  # 24
MDA_HEADER_FIXED_SIZE = MdaHeader.sizeof()  # 40


def lvm_crc(data: bytes | bytearray | memoryview, initial: int = INITIAL_CRC) -> int:
    """lvm2's calc_crc(initial, data): zlib's CRC-32 register run without the inversions.

    zlib.crc32(d, v) computes ~update(~v, d); seeding with ~initial and inverting the result
    leaves update(initial, d), which is what lvm2 stores. Chain calls for wrapped text.
    """
    return zlib.crc32(data, initial ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
