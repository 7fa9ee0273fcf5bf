"""Committing space maps incrementally: only what a transaction changed is written again.

A commit compares each map's counts with the committed ones. A bitmap block whose 2-bit
entries differ is shadowed (a new block, the old one released) and its index entry updated;
a block whose count is or was >= 3 gets its overflow (ref-count) tree entry inserted, changed
or removed through the transaction's copy-on-write btrees. Everything else (the other bitmaps,
index nodes, overflow nodes) stays where it is, as the kernel's space maps do: a commit costs
what it changed, not the size of the pool.

The metadata map counts its own blocks, so updating it changes it: new bitmap, index and
overflow blocks are allocated until a pass allocates nothing new (each bitmap is shadowed at
most once, so this ends after a few passes).
"""

from __future__ import annotations

import numpy as np

from dmimage.format.checksum import seal
from dmimage.format.constants import (
    BLOCK_SIZE,
    ENTRIES_PER_BITMAP,
    INDEX_ENTRY_SIZE,
    REF_COUNT_VALUE_SIZE,
    SALT_METADATA_INDEX,
)
from dmimage.format.layouts import INDEX_ENTRY_DTYPE
from dmimage.format.superblock import SpaceMapRoot
from dmimage.pdata.cow import SpaceAccount, Transaction, TreeKind
from dmimage.pdata.writer import _RAW_PAIR, U8, U64, _bitmap_stats, encode_bitmaps

REF_COUNT = TreeKind("ref-count", REF_COUNT_VALUE_SIZE, False)
DATA_INDEX = TreeKind("data space map index", INDEX_ENTRY_SIZE, False)

#: A block to write: (location, its 4096 bytes).
Block = tuple[int, bytes]


def _bitmap_block(counts: np.ndarray, nr_blocks: int, bm: int, loc: int
                  ) -> tuple[bytes, np.ndarray]:
    """Bitmap ``bm`` of ``counts`` sealed at ``loc``, and its index entry (blocknr, nr_free,
    none_free_before; entries past ``nr_blocks`` count as free, as the full writer has them)."""
    lo = bm * ENTRIES_PER_BITMAP
    hi = min(lo + ENTRIES_PER_BITMAP, nr_blocks)
    capped = np.zeros(ENTRIES_PER_BITMAP, U8)
    capped[: hi - lo] = np.minimum(counts[lo:hi], 3)
    nr_free, nfb = _bitmap_stats(capped, 1)
    block = encode_bitmaps(_RAW_PAIR[capped], np.array([loc], np.int64))[0].tobytes()
    entry = np.zeros(1, INDEX_ENTRY_DTYPE)
    entry["blocknr"] = loc
    entry["nr_free"] = nr_free
    entry["none_free_before"] = nfb
    return block, entry


def _changed(old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blocks whose count changed, bitmaps whose 2-bit entries changed)."""
    idx = np.flatnonzero(old != new)
    o, n = old[idx], new[idx]
    bms = np.unique(idx[np.minimum(o, 3) != np.minimum(n, 3)] // ENTRIES_PER_BITMAP)
    return idx, bms


def _set_overflow(tx: Transaction, root: int, block: int, count: int) -> int:
    """The overflow tree with ``block``'s entry set to ``count`` (removed when below 3)."""
    if count >= 3:
        root, _ = tx.insert(root, block, int(count).to_bytes(REF_COUNT_VALUE_SIZE, "little"),
                            REF_COUNT)
    else:
        root, _ = tx.remove(root, block, REF_COUNT)
    return root


def update_data_space_map(tx: Transaction, root: SpaceMapRoot, index: np.ndarray,
                          committed: np.ndarray) -> tuple[SpaceMapRoot, list[Block]]:
    """Bring the data space map from ``committed`` counts to ``tx.data``'s: the changed
    bitmaps (to write), index-tree entries and overflow entries; the new root."""
    new = tx.data.counts
    idx, bms = _changed(committed, new)
    o, n = committed[idx], new[idx]
    ov = (o >= 3) | (n >= 3)
    rc_root = root.ref_count_root
    for b, c in zip(idx[ov].tolist(), n[ov].tolist(), strict=True):
        rc_root = _set_overflow(tx, rc_root, b, c)
    index_root = root.bitmap_root
    blocks: list[Block] = []
    for bm in bms.tolist():
        loc = tx.meta.alloc()
        tx.meta.dec(int(index[bm]["blocknr"]))
        block, entry = _bitmap_block(new, root.nr_blocks, bm, loc)
        blocks.append((loc, block))
        index_root, _ = tx.insert(index_root, bm, entry.tobytes(), DATA_INDEX)
    nr_allocated = int(np.count_nonzero(new))
    return SpaceMapRoot(root.nr_blocks, nr_allocated, index_root, rc_root), blocks


def update_metadata_space_map(tx: Transaction, root: SpaceMapRoot, index: np.ndarray,
                              committed: np.ndarray) -> tuple[SpaceMapRoot, list[Block]]:
    """Bring the metadata space map from ``committed`` counts to ``tx.meta``'s, counting the
    blocks this allocates too: a new index block, the changed bitmaps, overflow entries.
    Call it last: after it, nothing may allocate or release a metadata block."""
    meta: SpaceAccount = tx.meta
    index_loc = meta.alloc()
    meta.dec(root.bitmap_root)
    rc_root = root.ref_count_root
    shadowed: dict[int, int] = {}
    #: what the overflow tree says now, for every block whose entry this commit touched
    overflow: dict[int, int] = {}
    while True:
        new = meta.counts
        idx, bms = _changed(committed, new)
        big = idx[(committed[idx] >= 3) | (new[idx] >= 3)]
        touched = set(big.tolist()) | set(overflow)  # a reverted count must be put back too
        progress = False
        for b in sorted(touched):
            want = int(new[b])
            have = overflow.get(b, int(committed[b]))
            if want == have or (want < 3 and have < 3):
                continue
            rc_root = _set_overflow(tx, rc_root, b, want)
            overflow[b] = want
            progress = True
        for bm in bms.tolist():
            if bm not in shadowed:
                shadowed[bm] = meta.alloc()
                meta.dec(int(index[bm]["blocknr"]))
                progress = True
        if not progress:
            break
    new = meta.counts
    entries = index.copy()
    blocks: list[Block] = []
    for bm, loc in sorted(shadowed.items()):
        block, entry = _bitmap_block(new, root.nr_blocks, bm, loc)
        blocks.append((loc, block))
        entries[bm] = entry[0]
    out = np.zeros(BLOCK_SIZE, U8)
    out[8:16] = np.array([index_loc], U64).view(U8)
    out[16 : 16 + entries.nbytes] = entries.view(U8)
    seal(out, SALT_METADATA_INDEX)
    blocks.append((index_loc, out.tobytes()))
    nr_allocated = int(np.count_nonzero(new[: root.nr_blocks]))
    return SpaceMapRoot(root.nr_blocks, nr_allocated, index_loc, rc_root), blocks
