"""The superblock as one typed value: the only code that turns its fields into bytes and back.

``layouts.Superblock`` (construct) documents the 364 used bytes; :meth:`Superblock.pack_into`
and :meth:`Superblock.unpack` go through its struct twin (one C call each), and the checksum
is sealed by format/checksum.py. Nothing here validates: the kernel's open-time checks are in
thin/superblock.py, and repair must be able to look at a damaged superblock.
"""

from __future__ import annotations

from dataclasses import dataclass

from dmimage.errors import FormatError
from dmimage.format.checksum import Block, WritableBlock, byte_view, seal
from dmimage.format.constants import (
    BLOCK_SIZE,
    ENTRIES_PER_BITMAP,
    METADATA_BLOCK_SECTORS,
    NEEDS_CHECK_FLAG,
    SALT_SUPERBLOCK,
    SPACE_MAP_ROOT_SIZE,
    SUPERBLOCK_LOCATION,
    SUPERBLOCK_MAGIC,
    SUPERBLOCK_USED_BYTES,
    SUPERBLOCK_VERSION,
)
from dmimage.format.layouts import SPACE_MAP_ROOT_STRUCT, SUPERBLOCK_STRUCT

_SM_ROOT_PAD = bytes(SPACE_MAP_ROOT_SIZE - SPACE_MAP_ROOT_STRUCT.size)


@dataclass(slots=True, frozen=True)
class SpaceMapRoot:
    """A space map's 128-byte root blob in the superblock (32 bytes used, the rest zero)."""

    nr_blocks: int
    nr_allocated: int
    #: metadata space map: its index block; data space map: its index btree's root
    bitmap_root: int
    #: the overflow btree for counts >= 3
    ref_count_root: int

    def pack(self) -> bytes:
        """The 128-byte blob (its unused 96 bytes zero)."""
        return SPACE_MAP_ROOT_STRUCT.pack(self.nr_blocks, self.nr_allocated, self.bitmap_root,
                                          self.ref_count_root) + _SM_ROOT_PAD

    @classmethod
    def unpack(cls, blob: bytes | memoryview) -> SpaceMapRoot:
        return cls(*SPACE_MAP_ROOT_STRUCT.unpack_from(blob))

    @property
    def nr_bitmaps(self) -> int:
        return -(-self.nr_blocks // ENTRIES_PER_BITMAP)


#: The roots a metadata-snapshot copy carries (thin-format.md §2.5).
ZERO_SPACE_MAP_ROOT = SpaceMapRoot(0, 0, 0, 0)


@dataclass(slots=True, frozen=True, kw_only=True)
class Superblock:
    """Every field of a superblock but the checksum (thin-format.md §2.1).

    The checksum is not a field: :meth:`pack_into` seals the block, and format/checksum.py
    reads and verifies the stored one. Defaults are what a fresh pool gets.
    """

    flags: int = 0
    #: the block's own location (0, or the held metadata-snapshot copy's block)
    blocknr: int = SUPERBLOCK_LOCATION
    uuid: bytes = bytes(16)
    magic: int = SUPERBLOCK_MAGIC
    version: int = SUPERBLOCK_VERSION
    time: int = 0
    trans_id: int = 0
    held_root: int = 0
    data_sm: SpaceMapRoot = ZERO_SPACE_MAP_ROOT
    metadata_sm: SpaceMapRoot = ZERO_SPACE_MAP_ROOT
    data_mapping_root: int
    device_details_root: int
    data_block_size: int
    metadata_block_size: int = METADATA_BLOCK_SECTORS
    metadata_nr_blocks: int
    compat_flags: int = 0
    compat_ro_flags: int = 0
    incompat_flags: int = 0

    @property
    def needs_check(self) -> bool:
        return bool(self.flags & NEEDS_CHECK_FLAG)

    @property
    def nr_data_blocks(self) -> int:
        return self.data_sm.nr_blocks

    @classmethod
    def unpack(cls, block: Block) -> Superblock:
        """Decode the used bytes of a superblock block, without validating anything."""
        if len(block) < SUPERBLOCK_USED_BYTES:
            raise FormatError(f"{len(block)} bytes are too short to hold a superblock",
                              field="superblock")
        (_csum, flags, blocknr, uuid, magic, version, time, trans_id, held_root, data_sm,
         metadata_sm, mapping_root, details_root, data_block_size, metadata_block_size,
         metadata_nr_blocks, compat, compat_ro, incompat) = SUPERBLOCK_STRUCT.unpack_from(
            byte_view(block))
        return cls(flags=flags, blocknr=blocknr, uuid=uuid, magic=magic, version=version,
                   time=time, trans_id=trans_id, held_root=held_root,
                   data_sm=SpaceMapRoot.unpack(data_sm),
                   metadata_sm=SpaceMapRoot.unpack(metadata_sm),
                   data_mapping_root=mapping_root, device_details_root=details_root,
                   data_block_size=data_block_size, metadata_block_size=metadata_block_size,
                   metadata_nr_blocks=metadata_nr_blocks, compat_flags=compat,
                   compat_ro_flags=compat_ro, incompat_flags=incompat)

    def pack_into(self, block: WritableBlock) -> None:
        """Write the used bytes into a 4 KiB block and seal it; bytes past 364 are kept as
        they are (the checksum covers them)."""
        if len(block) != BLOCK_SIZE:
            raise ValueError(f"a superblock block is {BLOCK_SIZE} bytes, not {len(block)}")
        SUPERBLOCK_STRUCT.pack_into(
            byte_view(block), 0, 0, self.flags, self.blocknr, self.uuid, self.magic, self.version,
            self.time, self.trans_id, self.held_root, self.data_sm.pack(),
            self.metadata_sm.pack(), self.data_mapping_root, self.device_details_root,
            self.data_block_size, self.metadata_block_size, self.metadata_nr_blocks,
            self.compat_flags, self.compat_ro_flags, self.incompat_flags)
        seal(block, SALT_SUPERBLOCK)

    def pack(self) -> bytes:
        """The whole sealed 4 KiB block, zero after the used bytes."""
        block = bytearray(BLOCK_SIZE)
        self.pack_into(block)
        return bytes(block)
