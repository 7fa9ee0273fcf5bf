"""The thin-pool superblock (block 0, or the held metadata-snapshot copy)."""

from __future__ import annotations

from dataclasses import dataclass

from dmimage.errors import BlockNumberError, ChecksumError, FormatError
from dmimage.format.checksum import block_checksum, sniff_block_type, stored_checksum
from dmimage.format.constants import NEEDS_CHECK_FLAG, SALT_SUPERBLOCK, SUPERBLOCK_MAGIC
from dmimage.format.layouts import Superblock as SuperblockLayout
from dmimage.pdata.block import BlockReader
from dmimage.pdata.spacemap import SpaceMapRoot


@dataclass(slots=True, frozen=True)
class Superblock:
    """Decoded superblock fields (see thin-format.md §2)."""

    location: int
    flags: int
    uuid: bytes
    magic: int
    version: int
    time: int
    trans_id: int
    held_root: int
    data_sm: SpaceMapRoot
    metadata_sm: SpaceMapRoot
    data_mapping_root: int
    device_details_root: int
    data_block_size: int
    metadata_block_size: int
    metadata_nr_blocks: int
    compat_flags: int
    compat_ro_flags: int
    incompat_flags: int

    @property
    def needs_check(self) -> bool:
        return bool(self.flags & NEEDS_CHECK_FLAG)

    @property
    def nr_data_blocks(self) -> int:
        return self.data_sm.nr_blocks


def parse_superblock(block: bytes | memoryview, location: int = 0) -> Superblock:
    """Decode without validation (for repair, which must look at damaged superblocks too)."""
    f = SuperblockLayout.parse(bytes(block[: SuperblockLayout.sizeof()]))
    return Superblock(
        location=location,
        flags=f.flags,
        uuid=bytes(f.uuid),
        magic=f.magic,
        version=f.version,
        time=f.time,
        trans_id=f.trans_id,
        held_root=f.held_root,
        data_sm=SpaceMapRoot.parse(f.data_space_map_root),
        metadata_sm=SpaceMapRoot.parse(f.metadata_space_map_root),
        data_mapping_root=f.data_mapping_root,
        device_details_root=f.device_details_root,
        data_block_size=f.data_block_size,
        metadata_block_size=f.metadata_block_size,
        metadata_nr_blocks=f.metadata_nr_blocks,
        compat_flags=f.compat_flags,
        compat_ro_flags=f.compat_ro_flags,
        incompat_flags=f.incompat_flags,
    )


def read_superblock(reader: BlockReader, location: int = 0) -> Superblock:
    """Read and validate a superblock as the kernel does on open (checksum, blocknr, magic)."""
    block = reader.block(location)
    if block_checksum(block, SALT_SUPERBLOCK) != stored_checksum(block):
        kind = sniff_block_type(block)
        if kind:
            hint = f" (it is a {kind} block)"
        elif not any(block):
            hint = " (the block is all zeros: unformatted metadata?)"
        else:
            hint = " (not thin-pool metadata, or damaged)"
        raise ChecksumError(f"superblock checksum mismatch{hint}", block=location, field="csum")
    sb = parse_superblock(block, location)
    if sb.magic != SUPERBLOCK_MAGIC:
        raise FormatError(f"bad magic {sb.magic} (expected {SUPERBLOCK_MAGIC})", block=location,
                          field="magic")
    own = int.from_bytes(bytes(block[8:16]), "little")
    if own != location:
        raise BlockNumberError(f"superblock says it is block {own}", block=location,
                               field="blocknr")
    return sb
