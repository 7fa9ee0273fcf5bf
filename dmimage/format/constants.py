"""Fixed numbers of the dm-thin metadata format."""

from __future__ import annotations

BLOCK_SIZE = 4096
SECTOR_SIZE = 512
METADATA_BLOCK_SECTORS = BLOCK_SIZE // SECTOR_SIZE

SUPERBLOCK_LOCATION = 0
SUPERBLOCK_MAGIC = 27022010
SUPERBLOCK_VERSION = 2
#: Only the first 512 bytes of block 0 carry the superblock: a single-sector write is atomic.
SUPERBLOCK_USED_BYTES = 364
NEEDS_CHECK_FLAG = 1

#: Block-type salts XORed into every checksum, so a block of one type never validates as another.
SALT_SUPERBLOCK = 160774
SALT_BTREE_NODE = 121107
SALT_BITMAP = 240779
SALT_METADATA_INDEX = 160478

BTREE_INTERNAL = 1
BTREE_LEAF = 2
BTREE_HEADER_SIZE = 32
#: Every btree key is a u64; KEY_END is one past the largest.
KEY_SIZE = 8
KEY_END = 1 << 64

BITMAP_HEADER_SIZE = 16
#: Two bits per block in the 4080 bytes after a bitmap's header.
ENTRIES_PER_BITMAP = (BLOCK_SIZE - BITMAP_HEADER_SIZE) * 4
INDEX_ENTRY_SIZE = 16
#: The metadata space map's index is one block: this caps the metadata device size.
MAX_METADATA_BITMAPS = (BLOCK_SIZE - 16) // INDEX_ENTRY_SIZE
MAX_METADATA_BLOCKS = MAX_METADATA_BITMAPS * ENTRIES_PER_BITMAP
SPACE_MAP_ROOT_SIZE = 128

#: Mapping values pack (data block << 24) | time (encoded in format/values.py only).
TIME_BITS = 24
TIME_MASK = (1 << TIME_BITS) - 1
MAX_DATA_BLOCK = (1 << 40) - 1

#: Value sizes of every btree in a thin pool. Internal nodes hold u64 child block numbers
#: whatever their tree's leaves hold.
INTERNAL_VALUE_SIZE = 8
MAPPING_VALUE_SIZE = 8  # bottom level: a mapping value; top level: a bottom tree's root
DEVICE_DETAILS_SIZE = 24
REF_COUNT_VALUE_SIZE = 4
#: Every leaf value size in a thin pool (the data space map's index tree holds index entries).
LEAF_VALUE_SIZES = (MAPPING_VALUE_SIZE, DEVICE_DETAILS_SIZE, INDEX_ENTRY_SIZE,
                    REF_COUNT_VALUE_SIZE)
#: The kernel's message interface takes 24-bit thin ids.
MAX_DEV_ID = (1 << 24) - 1
#: thin_dump prints device ids as u32 and thin_restore parses them so.
MAX_DUMP_DEV_ID = (1 << 32) - 1

MIN_DATA_BLOCK_SECTORS = 128
MAX_DATA_BLOCK_SECTORS = 2097152


def max_entries(value_size: int) -> int:
    """Node capacity the kernel uses for a value size: a multiple of 3 for its rebalancing."""
    n = (BLOCK_SIZE - BTREE_HEADER_SIZE) // (8 + value_size)
    return (n // 3) * 3


def valid_data_block_size(sectors: int) -> bool:
    """The kernel's rule: 64 KiB .. 1 GiB and a multiple of 64 KiB."""
    return (
        MIN_DATA_BLOCK_SECTORS <= sectors <= MAX_DATA_BLOCK_SECTORS
        and sectors % MIN_DATA_BLOCK_SECTORS == 0
    )
