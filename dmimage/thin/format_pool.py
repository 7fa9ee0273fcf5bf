"""Format: the metadata of an empty pool, laid out as the kernel formats it.

The kernel's ``__format_metadata`` bootstraps the metadata space map first (thin-format.md
§4.7, §5): block 0 superblock, 1 the metadata index block, 2 the metadata ref-count tree's
empty root, then one bitmap per 16320 metadata blocks; then the data space map's index root and
ref-count root, the mapping tree's root and the details tree's root (all empty leaves). The
data space map's bitmaps (one per 16320 data blocks, as the first resize adds them) follow.

Public API: :func:`format_pool` (to a device) and :func:`build_empty_pool` (in memory).
"""

from __future__ import annotations

import os

import numpy as np

from dmimage import devlock
from dmimage.errors import OutputTooSmallError, UsageError
from dmimage.format.checksum import seal
from dmimage.format.constants import (
    BLOCK_SIZE,
    ENTRIES_PER_BITMAP,
    MAX_DATA_BLOCK,
    MAX_METADATA_BLOCKS,
    SALT_METADATA_INDEX,
    valid_data_block_size,
)
from dmimage.format.layouts import INDEX_ENTRY_DTYPE
from dmimage.format.superblock import SpaceMapRoot, Superblock
from dmimage.pdata.writer import (
    _RAW_PAIR,
    INDEX_LEAF,
    MAPPING_LEAF,
    REF_COUNT_LEAF,
    MetadataImage,
    NodeKind,
    _bitmap_stats,
    build_tree,
    encode_bitmaps,
    encode_nodes,
    open_output,
)
from dmimage.thin.restore import DETAILS_LEAF

U64 = np.dtype("<u8")


def _empty_leaf(image: MetadataImage, kind: NodeKind, loc: int) -> None:
    image.put(loc, encode_nodes(kind, np.empty(0, U64), np.empty(0, kind.dtype), [0],
                                np.array([loc], np.int64)))


def build_empty_pool(nr_metadata_blocks: int, data_block_size: int,
                     nr_data_blocks: int) -> tuple[MetadataImage, bytes]:
    """(image, superblock) of an empty pool on a metadata device of that many blocks."""
    if not valid_data_block_size(int(data_block_size)):
        raise UsageError(
            f"invalid data block size {data_block_size} sectors: it must be a multiple of 128 "
            "sectors (64 KiB) between 128 and 2097152 (1 GiB)")
    if not 0 <= int(nr_data_blocks) <= MAX_DATA_BLOCK + 1:
        raise UsageError(f"nr_data_blocks {nr_data_blocks} is out of range (at most 2^40)")
    image = MetadataImage(nr_metadata_blocks)
    nr_meta = image.nr_blocks
    nbm = -(-nr_meta // ENTRIES_PER_BITMAP)
    image.alloc()  # superblock
    index_loc = image.alloc()
    meta_rc_root = image.alloc()
    meta_bitmaps = image.alloc_many(nbm)
    data_index_root = image.alloc()
    data_rc_root = image.alloc()
    mapping_root = image.alloc()
    details_root = image.alloc()
    for kind, loc in ((REF_COUNT_LEAF, meta_rc_root), (REF_COUNT_LEAF, data_rc_root),
                      (MAPPING_LEAF, mapping_root), (DETAILS_LEAF, details_root)):
        _empty_leaf(image, kind, loc)

    # data space map: zeroed bitmaps, indexed by the root leaf (or a tree when they are many)
    ndb = -(-int(nr_data_blocks) // ENTRIES_PER_BITMAP)
    data_bitmaps = image.alloc_many(ndb)
    for s in range(0, ndb, 1024):
        e = min(ndb, s + 1024)
        image.put(data_bitmaps[s:e], encode_bitmaps(
            np.zeros((e - s) * ENTRIES_PER_BITMAP, np.uint8), data_bitmaps[s:e]))
    entries = np.zeros(ndb, dtype=INDEX_ENTRY_DTYPE)
    entries["blocknr"] = data_bitmaps
    entries["nr_free"] = ENTRIES_PER_BITMAP
    if ndb <= INDEX_LEAF.max_entries:
        image.put(data_index_root, encode_nodes(INDEX_LEAF, np.arange(ndb, dtype=U64), entries,
                                                [ndb], np.array([data_index_root], np.int64)))
    else:
        image.dec(data_index_root)  # the empty root is replaced by a real index tree
        _empty_leaf(image, INDEX_LEAF, data_index_root)
        data_index_root = build_tree(image, INDEX_LEAF, np.arange(ndb, dtype=U64), entries)
    data_sm = SpaceMapRoot(int(nr_data_blocks), 0, data_index_root, data_rc_root)

    if image.overflowed:
        raise OutputTooSmallError(
            f"a metadata device of {nr_meta} blocks cannot hold an empty pool with "
            f"{nr_data_blocks} data blocks", needed_bytes=image.high_water * BLOCK_SIZE)
    # metadata space map: every block handed out so far has count 1
    counts = image.counts[:nr_meta]
    capped = np.zeros(nbm * ENTRIES_PER_BITMAP, np.uint8)
    capped[:nr_meta] = np.minimum(counts, 3)
    nr_free, nfb = _bitmap_stats(capped, nbm)
    for i in range(nbm):
        image.put(int(meta_bitmaps[i]), encode_bitmaps(
            _RAW_PAIR[capped[i * ENTRIES_PER_BITMAP:(i + 1) * ENTRIES_PER_BITMAP]],
            meta_bitmaps[i:i + 1]))
    index = np.zeros(BLOCK_SIZE, dtype=np.uint8)
    index[8:16] = np.array([index_loc], dtype=U64).view(np.uint8)
    ie = np.zeros(nbm, dtype=INDEX_ENTRY_DTYPE)
    ie["blocknr"] = meta_bitmaps
    ie["nr_free"] = nr_free
    ie["none_free_before"] = nfb
    index[16:16 + ie.nbytes] = ie.view(np.uint8)
    seal(index, SALT_METADATA_INDEX)
    image.put(index_loc, index)
    meta_sm = SpaceMapRoot(nr_meta, int(np.count_nonzero(counts)), index_loc, meta_rc_root)
    sb = Superblock(data_sm=data_sm, metadata_sm=meta_sm, data_mapping_root=mapping_root,
                    device_details_root=details_root, data_block_size=int(data_block_size),
                    metadata_nr_blocks=nr_meta)
    return image, sb.pack()


def format_pool(output: str | os.PathLike[str], data_block_size: int,
                nr_data_blocks: int) -> int:
    """Write an empty pool's metadata to an existing file or block device (never grown).

    Returns the metadata size in blocks. Nothing is written when the device is too small.
    """
    with devlock.hold(output, exclusive=True):
        return _format_locked(output, data_block_size, nr_data_blocks)


def _format_locked(output: str | os.PathLike[str], data_block_size: int,
                   nr_data_blocks: int) -> int:
    fd, size = open_output(output)
    try:
        nr_blocks = min(size // BLOCK_SIZE, MAX_METADATA_BLOCKS)
        if nr_blocks < 16:
            raise OutputTooSmallError(
                f"{os.fspath(output)} is too small: {size} bytes; the metadata needs at "
                f"least 16 blocks of 4 KiB ({16 * BLOCK_SIZE} bytes)",
                needed_bytes=16 * BLOCK_SIZE)
        image, sb = build_empty_pool(nr_blocks, data_block_size, nr_data_blocks)
        if image.high_water > nr_blocks:
            raise OutputTooSmallError(
                f"{os.fspath(output)} is too small for {nr_data_blocks} data blocks: "
                f"{size} bytes, needs {image.high_water * BLOCK_SIZE}",
                needed_bytes=image.high_water * BLOCK_SIZE)
        image.flush_to(fd, sb)
        return nr_blocks
    finally:
        os.close(fd)
