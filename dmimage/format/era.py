"""On-disk layout of dm-era metadata (drivers/md/dm-era-target.c).

- block 0: the superblock (checksum salt 146538381, magic 0o17660203573), holding the current
  era, the current writeset (nr_bits, bitset root), the writeset tree's root, the era array's
  root and a metadata snapshot location;
- the writeset tree: a btree keyed by era whose 12-byte values are (nr_bits u32, root u64):
  one archived writeset (a persistent-data bitset) per era;
- the era array: one little-endian u32 per origin block, the era it was last written in
  (as of the last archived writeset folded into it).
"""

from __future__ import annotations

import struct
from functools import cache
from typing import Any

import numpy as np

from dmimage.format.constants import SPACE_MAP_ROOT_SIZE

ERA_MAGIC = 0o17660203573
SALT_ERA_SUPERBLOCK = 146538381

ERA_SUPERBLOCK = struct.Struct("<IIQ16sQI128sIIIIIQQQQ")

#: A writeset tree value.
WRITESET_DTYPE = np.dtype([("nr_bits", "<u4"), ("root", "<u8")])
WRITESET_VALUE_SIZE = 12


#: The construct description EraSuperblock, built on first access (module ``__getattr__``):
#: only tests and docs read it; code uses the struct twin ERA_SUPERBLOCK.
@cache
def _descriptions() -> dict[str, Any]:
    from construct import Bytes, Int32ul, Int64ul, Struct

    from dmimage.format.layouts import superblock_head

    EraSuperblock = Struct(
        *superblock_head(),
        "metadata_space_map_root" / Bytes(SPACE_MAP_ROOT_SIZE),
        "data_block_size" / Int32ul,
        "metadata_block_size" / Int32ul,
        "nr_blocks" / Int32ul,
        "current_era" / Int32ul,
        "current_writeset_nr_bits" / Int32ul,
        "current_writeset_root" / Int64ul,
        "writeset_tree_root" / Int64ul,
        "era_array_root" / Int64ul,
        "metadata_snap" / Int64ul,
    )
    return {"EraSuperblock": EraSuperblock}


def __getattr__(name: str) -> Any:
    if name == "EraSuperblock":
        return _descriptions()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
