"""On-disk layouts of dm-cache metadata and of persistent-data's array blocks.

Facts from the kernel (drivers/md/dm-cache-metadata.c, persistent-data/dm-array.c,
dm-bitset.c):
- block 0 is the cache superblock (checksum salt 9031977, magic 06142003 octal); version 2
  adds ``dirty_root`` after the policy version;
- the mapping array holds one little-endian u64 per cache block: origin block << 16 | flags
  (1 valid, 2 dirty; version 2 keeps dirtiness in the dirty bitset instead);
- the hint array holds ``policy_hint_size`` bytes per cache block;
- an array is a btree (u64 keys: array block index; u64 values: the array block's location)
  of array blocks, each a 24-byte header then ``max_entries`` values; salt 595846735;
- a bitset is an array of u64 words, bit i of the set is bit i % 64 of word i // 64.
All integers are little-endian.
"""

from __future__ import annotations

import struct
from functools import cache
from typing import Any

import numpy as np

from dmimage.format.constants import SPACE_MAP_ROOT_SIZE

CACHE_MAGIC = 0o6142003
SALT_CACHE_SUPERBLOCK = 9031977
SALT_ARRAY_BLOCK = 595846735
POLICY_NAME_SIZE = 16
#: Superblock flag bits (dm-cache-metadata.c: enum superblock_flag_bits).
FLAG_CLEAN_SHUTDOWN = 1 << 0
FLAG_NEEDS_CHECK = 1 << 1
#: Mapping value flags (low 16 bits).
M_VALID = 1
M_DIRTY = 2
MAPPING_FLAG_BITS = 16

#: struct twin of CacheSuperblock (one C call); tests/test_cache.py checks they agree.
CACHE_SUPERBLOCK = struct.Struct("<IIQ16sQI16sI128sQQQQQIIIIIIIIII3IQ")

ARRAY_BLOCK_HEADER = struct.Struct("<IIIIQ")

#: The kernel's mapping value, one per cache block.
MAPPING_DTYPE = np.dtype("<u8")


#: The construct descriptions (CacheSuperblock, ArrayBlockHeader), built on first access
#: (module ``__getattr__``): importing construct costs a command start-up time, and only
#: tests and docs read them; code uses the struct twins.
@cache
def _descriptions() -> dict[str, Any]:
    from construct import Array, Bytes, Int32ul, Int64ul, Struct

    from dmimage.format.layouts import superblock_head

    CacheSuperblock = Struct(
        *superblock_head(),
        "policy_name" / Bytes(POLICY_NAME_SIZE),
        "policy_hint_size" / Int32ul,
        "metadata_space_map_root" / Bytes(SPACE_MAP_ROOT_SIZE),
        "mapping_root" / Int64ul,
        "hint_root" / Int64ul,
        "discard_root" / Int64ul,
        "discard_block_size" / Int64ul,
        "discard_nr_blocks" / Int64ul,
        "data_block_size" / Int32ul,
        "metadata_block_size" / Int32ul,
        "cache_blocks" / Int32ul,
        "compat_flags" / Int32ul,
        "compat_ro_flags" / Int32ul,
        "incompat_flags" / Int32ul,
        "read_hits" / Int32ul,
        "read_misses" / Int32ul,
        "write_hits" / Int32ul,
        "write_misses" / Int32ul,
        "policy_version" / Array(3, Int32ul),
        "dirty_root" / Int64ul,  # version 2 only
    )

    ArrayBlockHeader = Struct(
        "csum" / Int32ul,
        "max_entries" / Int32ul,
        "nr_entries" / Int32ul,
        "value_size" / Int32ul,
        "blocknr" / Int64ul,
    )
    return {"CacheSuperblock": CacheSuperblock, "ArrayBlockHeader": ArrayBlockHeader}


def __getattr__(name: str) -> Any:
    if name in ("CacheSuperblock", "ArrayBlockHeader"):
        return _descriptions()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
