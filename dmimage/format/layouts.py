"""construct Structs for every on-disk header, and numpy dtypes for the arrays in hot paths.

construct documents each layout (built on first access: ``_descriptions``). Code packs and
unpacks through the struct/numpy twins below (one C call per header, numpy views for the bulk
arrays: btree keys and values, bitmap words, index entries, device details), which must stay
byte-identical to the Structs (tests/test_layouts.py builds with one and parses with the
other). The typed values that use them are in format/superblock.py and format/values.py.
"""

from __future__ import annotations

import struct
from functools import cache
from typing import Any

import numpy as np

from dmimage.format.constants import (
    DEVICE_DETAILS_SIZE,
    INDEX_ENTRY_SIZE,
    MAX_METADATA_BITMAPS,
    SPACE_MAP_ROOT_SIZE,
    SUPERBLOCK_USED_BYTES,
)

#: struct twin of Superblock (the 364 used bytes of block 0).
SUPERBLOCK_STRUCT = struct.Struct("<IIQ16sQIIQQ128s128sQQIIQIII")
#: struct twin of BtreeNodeHeader: one C call per node on the walk's hot path.
BTREE_HEADER_STRUCT = struct.Struct("<IIQIIII")
#: struct twin of the superblock's space-map root's 32 used bytes.
SPACE_MAP_ROOT_STRUCT = struct.Struct("<QQQQ")

#: numpy twins of the Structs above, for whole-block views.
BTREE_HEADER_DTYPE = np.dtype(
    [
        ("csum", "<u4"),
        ("flags", "<u4"),
        ("blocknr", "<u8"),
        ("nr_entries", "<u4"),
        ("max_entries", "<u4"),
        ("value_size", "<u4"),
        ("padding", "<u4"),
    ]
)
INDEX_ENTRY_DTYPE = np.dtype([("blocknr", "<u8"), ("nr_free", "<u4"), ("none_free_before", "<u4")])
DEVICE_DETAILS_DTYPE = np.dtype(
    [
        ("mapped_blocks", "<u8"),
        ("transaction_id", "<u8"),
        ("creation_time", "<u4"),
        ("snapshotted_time", "<u4"),
    ]
)
assert INDEX_ENTRY_DTYPE.itemsize == INDEX_ENTRY_SIZE
assert DEVICE_DETAILS_DTYPE.itemsize == DEVICE_DETAILS_SIZE
assert SUPERBLOCK_STRUCT.size == SUPERBLOCK_USED_BYTES
assert BTREE_HEADER_STRUCT.size == BTREE_HEADER_DTYPE.itemsize
assert SPACE_MAP_ROOT_STRUCT.size <= SPACE_MAP_ROOT_SIZE


#: The construct descriptions, built on first use (module ``__getattr__``): importing construct
#: costs a command ~25 ms of start-up, and only tests and docs read them.
_DESCRIPTIONS = ("SpaceMapRoot", "Superblock", "BtreeNodeHeader", "IndexEntry",
                 "MetadataIndexHeader", "BitmapHeader", "DeviceDetails", "MetadataIndexBlock")


def superblock_head() -> tuple[Any, ...]:
    """The construct fields every persistent-data superblock starts with (thin, cache and
    era alike): checksum, flags, its own block number, uuid, magic and version."""
    from construct import Bytes, Int32ul, Int64ul

    return ("csum" / Int32ul, "flags" / Int32ul, "blocknr" / Int64ul, "uuid" / Bytes(16),
            "magic" / Int64ul, "version" / Int32ul)


@cache
def _descriptions() -> dict[str, Any]:
    from construct import Bytes, Int32ul, Int64ul, Padding, Struct

    #: The 128-byte blob in the superblock that roots a space map (32 bytes used, rest zero).
    SpaceMapRoot = Struct(
        "nr_blocks" / Int64ul,
        "nr_allocated" / Int64ul,
        "bitmap_root" / Int64ul,  # metadata SM: index block; data SM: index btree root
        "ref_count_root" / Int64ul,  # overflow btree for counts >= 3
        Padding(SPACE_MAP_ROOT_SIZE - 32),
    )

    Superblock = Struct(
        *superblock_head(),
        "time" / Int32ul,
        "trans_id" / Int64ul,
        "held_root" / Int64ul,
        "data_space_map_root" / Bytes(SPACE_MAP_ROOT_SIZE),
        "metadata_space_map_root" / Bytes(SPACE_MAP_ROOT_SIZE),
        "data_mapping_root" / Int64ul,
        "device_details_root" / Int64ul,
        "data_block_size" / Int32ul,
        "metadata_block_size" / Int32ul,
        "metadata_nr_blocks" / Int64ul,
        "compat_flags" / Int32ul,
        "compat_ro_flags" / Int32ul,
        "incompat_flags" / Int32ul,
    )

    BtreeNodeHeader = Struct(
        "csum" / Int32ul,
        "flags" / Int32ul,
        "blocknr" / Int64ul,
        "nr_entries" / Int32ul,
        "max_entries" / Int32ul,
        "value_size" / Int32ul,
        "padding" / Int32ul,
    )

    IndexEntry = Struct(
        "blocknr" / Int64ul,
        "nr_free" / Int32ul,
        "none_free_before" / Int32ul,
    )

    MetadataIndexHeader = Struct(
        "csum" / Int32ul,
        "padding" / Int32ul,
        "blocknr" / Int64ul,
    )

    BitmapHeader = Struct(
        "csum" / Int32ul,
        "not_used" / Int32ul,
        "blocknr" / Int64ul,
    )

    DeviceDetails = Struct(
        "mapped_blocks" / Int64ul,
        "transaction_id" / Int64ul,
        "creation_time" / Int32ul,
        "snapshotted_time" / Int32ul,
    )

    MetadataIndexBlock = Struct(
        "header" / MetadataIndexHeader,
        "entries" / IndexEntry[MAX_METADATA_BITMAPS],
    )

    assert IndexEntry.sizeof() == INDEX_ENTRY_DTYPE.itemsize
    assert DeviceDetails.sizeof() == DEVICE_DETAILS_DTYPE.itemsize
    assert Superblock.sizeof() == SUPERBLOCK_STRUCT.size
    assert BtreeNodeHeader.sizeof() == BTREE_HEADER_STRUCT.size
    found = locals()
    return {name: found[name] for name in _DESCRIPTIONS}


def __getattr__(name: str) -> Any:
    if name in _DESCRIPTIONS:
        return _descriptions()[name]
    raise AttributeError(name)
