"""A dm-cache metadata device read whole: superblock, mapping array, hint array, dirty bitset.

Reading follows the kernel's layout (format/cache.py); the superblock is cache/superblock.py's
(its names are re-exported here). Damage raises MetadataError naming the
block and structure; callers that want every problem use cache/check.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dmimage.cache.superblock import CacheSuperblock, parse_superblock
from dmimage.errors import FormatError
from dmimage.format.cache import MAPPING_FLAG_BITS
from dmimage.pdata.array import read_array, read_bitset
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import BtreeWalker

__all__ = ["CacheMetadata", "CacheSuperblock", "parse_superblock", "read_cache"]


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
