"""Reading the thin-pool superblock (block 0, or the held metadata-snapshot copy) with the
kernel's open-time checks. The value and its packing are format/superblock.py's."""

from __future__ import annotations

from dmimage.errors import BlockNumberError, ChecksumError, FormatError
from dmimage.format.checksum import checksum_ok, sniff_block_type
from dmimage.format.constants import SALT_SUPERBLOCK, SUPERBLOCK_MAGIC
from dmimage.format.superblock import SpaceMapRoot, Superblock
from dmimage.pdata.block import BlockReader

__all__ = ["Superblock", "SpaceMapRoot", "read_superblock"]


def read_superblock(reader: BlockReader, location: int = 0) -> Superblock:
    """Read and validate a superblock as the kernel does on open (checksum, blocknr, magic)."""
    block = reader.block(location)
    if not checksum_ok(block, SALT_SUPERBLOCK):
        kind = sniff_block_type(block)
        if kind:
            hint = f" (it is a {kind} block)"
        elif not any(block):
            hint = " (the block is all zeros: unformatted metadata?)"
        else:
            hint = " (not thin-pool metadata, or damaged)"
        raise ChecksumError(f"superblock checksum mismatch{hint}", block=location, field="csum")
    sb = Superblock.unpack(block)
    if sb.magic != SUPERBLOCK_MAGIC:
        raise FormatError(f"bad magic {sb.magic} (expected {SUPERBLOCK_MAGIC})", block=location,
                          field="magic")
    if sb.blocknr != location:
        raise BlockNumberError(f"superblock says it is block {sb.blocknr}", block=location,
                               field="blocknr")
    return sb
