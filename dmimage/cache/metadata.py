"""A dm-cache metadata device read whole: superblock, mapping array, hint array, dirty bitset.

Reading follows the kernel's layout (format/cache.py). Damage raises MetadataError naming the
block and structure; callers that want every problem use cache/check.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dmimage.errors import BlockNumberError, ChecksumError, FormatError
from dmimage.format.cache import (
    CACHE_MAGIC,
    CACHE_SUPERBLOCK,
    FLAG_CLEAN_SHUTDOWN,
    FLAG_NEEDS_CHECK,
    MAPPING_FLAG_BITS,
    SALT_CACHE_SUPERBLOCK,
)
from dmimage.format.checksum import checksum_ok
from dmimage.format.superblock import SpaceMapRoot
from dmimage.pdata.array import read_array, read_bitset
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import BtreeWalker


@dataclass(frozen=True, kw_only=True)
class CacheSuperblock:
    flags: int
    blocknr: int
    uuid: bytes
    magic: int
    version: int
    policy_name: str
    policy_hint_size: int
    metadata_sm: SpaceMapRoot
    mapping_root: int
    hint_root: int
    discard_root: int
    discard_block_size: int
    discard_nr_blocks: int
    data_block_size: int
    metadata_block_size: int
    cache_blocks: int
    compat_flags: int
    compat_ro_flags: int
    incompat_flags: int
    read_hits: int
    read_misses: int
    write_hits: int
    write_misses: int
    policy_version: tuple[int, int, int]
    dirty_root: int  # version 2 only; 0 otherwise

    @property
    def clean_shutdown(self) -> bool:
        return bool(self.flags & FLAG_CLEAN_SHUTDOWN)

    @property
    def needs_check(self) -> bool:
        return bool(self.flags & FLAG_NEEDS_CHECK)


def parse_superblock(block: memoryview | bytes, *, verify_checksum: bool = True
                     ) -> CacheSuperblock:
    """Block 0, checked as every reader must: checksum, location, magic, version (repair
    alone may skip the checksum and rely on the other three)."""
    if verify_checksum and not checksum_ok(block, SALT_CACHE_SUPERBLOCK):
        raise ChecksumError("bad checksum (not a dm-cache superblock?)", block=0,
                            field="superblock")
    f = CACHE_SUPERBLOCK.unpack_from(block)
    (_csum, flags, blocknr, uuid, magic, version, policy, hint_size, sm_root, mapping_root,
     hint_root, discard_root, discard_bs, discard_nr, data_bs, meta_bs, cache_blocks, compat,
     compat_ro, incompat, rh, rm, wh, wm, pv0, pv1, pv2, dirty_root) = f
    if blocknr != 0:
        raise BlockNumberError(f"superblock says it lives at block {blocknr}", block=0,
                               field="superblock blocknr")
    if magic != CACHE_MAGIC:
        raise FormatError(f"magic {magic:#x}, expected {CACHE_MAGIC:#x}", block=0,
                          field="superblock magic")
    if version not in (1, 2):
        raise FormatError(f"unsupported metadata version {version}", block=0,
                          field="superblock version")
    return CacheSuperblock(
        flags=flags, blocknr=blocknr, uuid=uuid, magic=magic, version=version,
        policy_name=policy.split(b"\0", 1)[0].decode("utf-8", "replace"),
        policy_hint_size=hint_size, metadata_sm=SpaceMapRoot.unpack(sm_root),
        mapping_root=mapping_root, hint_root=hint_root, discard_root=discard_root,
        discard_block_size=discard_bs, discard_nr_blocks=discard_nr, data_block_size=data_bs,
        metadata_block_size=meta_bs, cache_blocks=cache_blocks, compat_flags=compat,
        compat_ro_flags=compat_ro, incompat_flags=incompat, read_hits=rh, read_misses=rm,
        write_hits=wh, write_misses=wm, policy_version=(pv0, pv1, pv2),
        dirty_root=dirty_root if version >= 2 else 0)


@dataclass(frozen=True)
class CacheMetadata:
    sb: CacheSuperblock
    #: per cache block: the raw mapping value (origin block << 16 | flags)
    mappings: np.ndarray
    #: per cache block: ``policy_hint_size`` bytes (empty array when there are no hints)
    hints: np.ndarray
    #: per cache block, version 2 only (None for version 1: dirtiness is in the flags)
    dirty_bits: np.ndarray | None

    @property
    def valid(self) -> np.ndarray:
        return (self.mappings & 1).astype(bool)

    @property
    def dirty(self) -> np.ndarray:
        if self.dirty_bits is not None:
            return self.dirty_bits
        return (self.mappings & 2).astype(bool)

    @property
    def origin_blocks(self) -> np.ndarray:
        return self.mappings >> np.uint64(MAPPING_FLAG_BITS)


def read_cache(reader: BlockReader, walker: BtreeWalker | None = None) -> CacheMetadata:
    """Read everything dump shows; the first damage raises."""
    sb = parse_superblock(reader.block(0))
    walker = walker or BtreeWalker(reader)
    dirty = None
    if sb.version >= 2:
        if sb.dirty_root == 0:
            raise FormatError("version 2 metadata without a dirty bitset", block=0,
                              field="superblock dirty_root")
        dirty = read_bitset(walker, sb.dirty_root, sb.cache_blocks, "dirty bitset")
    mappings = read_array(walker, sb.mapping_root, 8, "mapping array").values
    maps = mappings.reshape(-1).view("<u8").astype(np.uint64) if len(mappings) else \
        np.zeros(0, np.uint64)
    hints = np.zeros((0, max(sb.policy_hint_size, 1)), np.uint8)
    if sb.hint_root != 0 and sb.policy_hint_size != 0:
        hints = read_array(walker, sb.hint_root, sb.policy_hint_size, "hint array").values
    return CacheMetadata(sb, maps, hints, dirty)
