"""Clear the dirty bits of written-back cache blocks in the metadata, as cache_writeback 1.1
does after its copy (unless --no-metadata-update).

1.1 rewrites the dirty bitset's (or, in version 1, the mapping array's) blocks in place. Here
the update is a transaction like the kernel's commit: every structure (discard bitset,
mapping array, dirty bitset, hint array, metadata space map) is written afresh into blocks
the committed metadata does not use, flushed, and only then the superblock, which points at
them, is written and flushed (ordered_write.commit_last). A crash before the superblock
lands leaves the old metadata whole: the blocks still count as dirty, and the kernel would
copy them once more, which is harmless.
"""

from __future__ import annotations

import os

import numpy as np

from dmimage.cache.metadata import CacheMetadata, parse_superblock
from dmimage.errors import DeviceError, OutputTooSmallError
from dmimage.format.cache import CACHE_SUPERBLOCK, M_DIRTY, SALT_CACHE_SUPERBLOCK
from dmimage.format.checksum import seal
from dmimage.format.constants import BLOCK_SIZE
from dmimage.ordered_write import Write, commit_last
from dmimage.pdata.array import read_bitset, write_array
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import BtreeWalker
from dmimage.pdata.spacemap import read_space_map
from dmimage.pdata.writer import MetadataImage, write_metadata_space_map


class _FreeSpaceImage(MetadataImage):
    """A MetadataImage that allocates only blocks ``busy`` (the committed metadata) leaves
    free, so nothing the old superblock points at is overwritten before the new one lands."""

    def __init__(self, nr_blocks: int, busy: np.ndarray):
        super().__init__(nr_blocks)
        self._free = ~busy[:self.nr_blocks]
        self._free[0] = False
        self.counts[0] = 1  # the superblock, written apart, counted like every block
        self._allocated[0] = True

    def _alloc_locs(self, k: int) -> np.ndarray:
        if k == 0:
            return np.empty(0, np.int64)
        free = np.flatnonzero(self._free[self.cursor:])[:k] + self.cursor
        if len(free) < k:
            raise OutputTooSmallError("the metadata device has too few free blocks to update "
                                      f"the dirty bits ({k - len(free)} more needed); use "
                                      "--no-metadata-update", needed_bytes=0)
        self._free[free] = False
        self.cursor = int(free[-1]) + 1
        self.counts[free] = 1
        self._allocated[free] = True
        return free.astype(np.int64)

    def _alloc_one(self) -> int:
        return int(self._alloc_locs(1)[0])


def _u64_rows(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, "<u8").view(np.uint8).reshape(-1, 8)


def _bitset_rows(bits: np.ndarray) -> np.ndarray:
    padded = np.concatenate([bits.astype(bool), np.zeros(-len(bits) % 64, bool)])
    return np.packbits(padded, bitorder="little").reshape(-1, 8)


def clear_dirty(path: str, fd: int, md: CacheMetadata, cblocks: np.ndarray) -> None:
    """Commit ``md`` with cache blocks ``cblocks`` clean, to the metadata at ``path``
    (``fd`` open for writing; the caller holds its exclusive lock and read ``md`` under it)."""
    if not len(cblocks):
        return
    with BlockReader(path) as reader:
        raw_sb = bytes(reader.block(0))
        sb = parse_superblock(raw_sb)
        walker = BtreeWalker(reader)
        committed = read_space_map(reader, sb.metadata_sm, walker, metadata=True).counts
        discard = None
        if sb.discard_root:
            discard = read_bitset(walker, sb.discard_root, sb.discard_nr_blocks,
                                  "discard bitset")
    busy = np.zeros(max(sb.metadata_sm.nr_blocks, len(committed)), bool)
    busy[:len(committed)] = committed > 0
    image = _FreeSpaceImage(sb.metadata_sm.nr_blocks, busy)
    discard_root = 0 if discard is None else write_array(image, _bitset_rows(discard))
    maps = md.mappings.copy()
    dirty_root = sb.dirty_root
    if md.dirty_bits is None:
        maps[cblocks] &= ~np.uint64(M_DIRTY)
    else:
        bits = md.dirty_bits.copy()
        bits[cblocks] = False
        dirty_root = write_array(image, _bitset_rows(bits))
    mapping_root = write_array(image, _u64_rows(maps))
    hint_root = 0
    if sb.hint_root and sb.policy_hint_size:
        hint_root = write_array(image, np.ascontiguousarray(md.hints, np.uint8))
    sm_root = write_metadata_space_map(image)
    fields = list(CACHE_SUPERBLOCK.unpack_from(raw_sb))
    fields[8:12] = [sm_root.pack(), mapping_root, hint_root, discard_root]
    if sb.version >= 2:
        fields[27] = dirty_root
    new_sb = bytearray(raw_sb)
    CACHE_SUPERBLOCK.pack_into(new_sb, 0, *fields)
    seal(new_sb, SALT_CACHE_SUPERBLOCK)
    body = [Write(fd, start * BLOCK_SIZE, [memoryview(seg.reshape(-1).data)])
            for start, seg in image.segments()]
    try:
        commit_last([fd], body, [Write(fd, 0, [memoryview(bytes(new_sb))])])
    except DeviceError as err:
        raise DeviceError(f"{path}: {err}") from None


def open_metadata_rw(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise DeviceError(f"{path}: {exc.strerror}") from None
