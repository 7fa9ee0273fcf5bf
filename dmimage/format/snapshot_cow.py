"""On-disk layout of dm-snapshot's persistent exception store (the COW device).

Facts from the kernel (drivers/md/dm-snap-persistent.c, dm-exception-store.c):
- chunk 0 holds the header: magic, valid flag, version, chunk size in 512-byte sectors. A
  magic of 0 means a store the kernel has never initialised (it writes the header then);
- metadata areas follow, each one chunk of 16-byte exceptions (old chunk on the origin, new
  chunk on the COW device), ``chunk_bytes // 16`` per area. Area ``i`` sits at chunk
  ``1 + i * (per_area + 1)``: the data chunks an area describes come right after it;
- the kernel reads areas in order until one is not full; inside an area, an exception whose
  new chunk is 0 (the header's chunk, never a data chunk) ends the list;
- a full area is followed by a zeroed next area before its own commit, so the area after the
  last full one always exists on disk;
- the chunk size is a power of two no larger than INT_MAX >> 9 sectors.
All integers are little-endian.
"""

from __future__ import annotations

import struct

import numpy as np
from construct import Int32ul, Int64ul, Struct

SNAP_MAGIC = 0x70416E53
DISK_VERSION = 1
#: Chunks before the first metadata area.
HEADER_CHUNKS = 1
EXCEPTION_SIZE = 16
SECTOR_SIZE = 512
#: dm_exception_store_set_chunk_size: chunk_size > INT_MAX >> SECTOR_SHIFT is refused.
MAX_CHUNK_SECTORS = (2**31 - 1) >> 9

DiskHeader = Struct(
    "magic" / Int32ul,
    "valid" / Int32ul,
    "version" / Int32ul,
    "chunk_size" / Int32ul,  # sectors
)

DiskException = Struct(
    "old_chunk" / Int64ul,
    "new_chunk" / Int64ul,
)

#: Struct twin of DiskHeader (one C call); tests/test_snapshot_store.py checks they agree.
HEADER = struct.Struct("<4I")

#: numpy twin of DiskException: a whole metadata area in one view.
EXCEPTION_DTYPE = np.dtype([("old_chunk", "<u8"), ("new_chunk", "<u8")])


def exceptions_per_area(chunk_sectors: int) -> int:
    return chunk_sectors * SECTOR_SIZE // EXCEPTION_SIZE


def area_chunk(area: int, per_area: int) -> int:
    """The chunk that holds metadata area ``area``."""
    return HEADER_CHUNKS + area * (per_area + 1)
