"""Reading the two space maps: 2-bit reference counts in bitmap blocks, >= 3 in an overflow tree.

Both maps share the bitmap and overflow formats and differ only in their index: the metadata
map has one index block (at most 255 bitmaps), the data map an index btree. Bitmaps are decoded
with one table lookup per byte over whole blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dmimage.errors import BlockNumberError, ChecksumError, FormatError, MetadataError
from dmimage.format.checksum import block_checksum, sniff_block_type, stored_checksum
from dmimage.format.constants import (
    BITMAP_HEADER_SIZE,
    BLOCK_SIZE,
    INDEX_ENTRY_SIZE,
    MAX_METADATA_BITMAPS,
    REF_COUNT_VALUE_SIZE,
    SALT_BITMAP,
    SALT_METADATA_INDEX,
)
from dmimage.format.layouts import INDEX_ENTRY_DTYPE
from dmimage.format.superblock import SpaceMapRoot
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import U64, BtreeWalker, ErrorSink, Node, _prefixed, _raise
from dmimage.pdata.leaves import checksums_match

INDEX_VALUE_SIZE = INDEX_ENTRY_SIZE


def _bitmap_lut() -> np.ndarray:
    """Byte -> its four 2-bit counts. In each pair the even bit is the high bit."""
    v = np.arange(256, dtype=np.uint8)[:, None]
    k = np.arange(4, dtype=np.uint8)[None, :]
    return (((v >> (2 * k)) & 1) << 1 | ((v >> (2 * k + 1)) & 1)).astype(np.uint8)


BITMAP_LUT = _bitmap_lut()
#: The same table, each byte's four counts as one little-endian u32: one gather per byte
#: instead of four (a 10M-block data map is 2.5M bytes).
_BITMAP_LUT32 = BITMAP_LUT.view("<u4").reshape(256)


def decode_bitmap(payload: np.ndarray) -> np.ndarray:
    """Counts (uint8, 0..3) for the 2-bit entries of raw bitmap bytes (any multiple of bytes)."""
    flat = np.ascontiguousarray(payload, np.uint8).reshape(-1)
    counts: np.ndarray = _BITMAP_LUT32[flat].view(np.uint8)
    return counts


@dataclass(slots=True)
class SpaceMap:
    """A decoded space map: the true count of every block, and where its pieces live."""

    root: SpaceMapRoot
    counts: np.ndarray  # uint32, one per block in [0, nr_blocks)
    index: np.ndarray  # INDEX_ENTRY_DTYPE, one per bitmap
    index_block: int | None  # the metadata map's index block; None for the data map

    @property
    def nr_allocated(self) -> int:
        return int(np.count_nonzero(self.counts))


def read_bitmap_payload(reader: BlockReader, blocknr: int,
                        on_error: ErrorSink = _raise) -> np.ndarray:
    """The 4080 count bytes of a bitmap block. A wrong self-location is reported to
    ``on_error`` (the kernel refuses the block) but the payload is still returned, so a checker
    does not cascade one bad header into thousands of count mismatches."""
    block = reader.block(blocknr)
    if block_checksum(block, SALT_BITMAP) != stored_checksum(block):
        kind = sniff_block_type(block)
        hint = f" (it is a {kind} block)" if kind else ""
        raise ChecksumError(f"bitmap checksum mismatch{hint}", block=blocknr, field="csum")
    own = int(np.frombuffer(block, U64, 1, 8)[0])
    if own != blocknr:
        on_error(BlockNumberError(f"bitmap says it is block {own}", block=blocknr,
                                  field="blocknr"))
    return np.frombuffer(block, np.uint8, BLOCK_SIZE - BITMAP_HEADER_SIZE, BITMAP_HEADER_SIZE)


def _sound_payloads(reader: BlockReader, blocks: np.ndarray) -> np.ndarray | None:
    """The count bytes of the bitmaps ``blocks`` (int64) in one row gather, if every one is
    in range, carries a bitmap's checksum and names itself; None (nothing checked or counted)
    otherwise (the caller then reads them one at a time with :func:`read_bitmap_payload`,
    which names the problem). One block at a time, a 10M-block data map's 2,450 bitmaps cost
    ~3-4 ms more of check's critical path (after the walk, before the comparison)."""
    n = reader.nr_blocks
    if not len(blocks) or int(blocks.min()) < 0 or int(blocks.max()) >= n:
        return None
    if not checksums_match(reader, blocks, SALT_BITMAP):
        return None
    rows = np.frombuffer(reader.buffer(), U64, n * (BLOCK_SIZE // 8)).reshape(n, -1)
    if not bool((rows[blocks, 1] == blocks.astype(U64)).all()):  # the header's blocknr
        return None
    payload: np.ndarray = rows[blocks, BITMAP_HEADER_SIZE // 8:].view(np.uint8).reshape(-1)
    return payload


def _any_three(counts: np.ndarray, chunk: int = 1 << 20) -> bool:
    """Whether any count is 3, a chunk at a time: a whole-map mask (10 MB at 10M blocks)
    costs fresh pages to fault in (~2-3 ms here), a reused chunk none."""
    return any(bool((counts[i:i + chunk] == 3).any()) for i in range(0, len(counts), chunk))


def read_metadata_index(reader: BlockReader, root: SpaceMapRoot) -> np.ndarray:
    """The index entries of the metadata space map (validated index block)."""
    b = root.bitmap_root
    block = reader.block(b)
    if block_checksum(block, SALT_METADATA_INDEX) != stored_checksum(block):
        kind = sniff_block_type(block)
        hint = f" (it is a {kind} block)" if kind else ""
        raise ChecksumError(f"metadata space map index checksum mismatch{hint}", block=b,
                            field="csum")
    own = int(np.frombuffer(block, U64, 1, 8)[0])
    if own != b:
        raise BlockNumberError(f"metadata space map index says it is block {own}", block=b,
                               field="blocknr")
    n = root.nr_bitmaps
    if n > MAX_METADATA_BITMAPS:
        raise FormatError(f"metadata space map nr_blocks {root.nr_blocks} needs {n} bitmaps, "
                          f"more than the {MAX_METADATA_BITMAPS} an index block holds",
                          block=0, field="metadata_space_map_root.nr_blocks")
    return np.frombuffer(block, INDEX_ENTRY_DTYPE, n, 16).copy()


def read_data_index(walker: BtreeWalker, root: SpaceMapRoot) -> np.ndarray:
    """The index entries of the data space map, from its index btree (keys must be 0..n-1)."""
    keys_parts: list[np.ndarray] = []
    vals_parts: list[np.ndarray] = []

    def leaf(node: Node) -> None:
        keys_parts.append(node.keys)
        vals_parts.append(node.values(INDEX_ENTRY_DTYPE))

    walker.walk(root.bitmap_root, INDEX_VALUE_SIZE, leaf, what="data space map index")
    n = root.nr_bitmaps
    if not keys_parts:
        keys = np.empty(0, U64)
        vals = np.empty(0, INDEX_ENTRY_DTYPE)
    else:
        keys = np.concatenate(keys_parts)
        vals = np.concatenate(vals_parts)
    order = np.argsort(keys, kind="stable")
    keys, vals = keys[order], vals[order]
    if len(keys) != n or (n and not np.array_equal(keys, np.arange(n, dtype=U64))):
        what = (f"has {len(keys)} entries, expected {n}" if len(keys) != n
                else f"keys are not 0..{n - 1}")
        walker.on_error(MetadataError(
            f"data space map index {what} (nr_blocks {root.nr_blocks})",
            block=root.bitmap_root, field="data space map index"))
        if len(keys) == n:
            # the right number of entries under wrong keys: read them in order, as thin_check
            # 1.1 does, so the one wrong key is not also reported as every count of the bitmap
            # it no longer names (and a missing entry is not read from block 0)
            return np.concatenate(vals_parts)
        keep = keys < n
        for extra in vals[~keep]["blocknr"].tolist():
            # entries beyond nr_blocks still reference their bitmaps: counting them keeps a
            # too-small nr_blocks from also reporting those bitmaps as leaked
            walker._count(extra)
        fixed = np.zeros(n, INDEX_ENTRY_DTYPE)
        fixed[keys[keep].astype(np.int64)] = vals[keep]
        return fixed
    return vals


def _prefixing(on_error: ErrorSink, what: str) -> ErrorSink:
    """``on_error``, with ``what`` put in front of each error's detail."""
    return lambda e: on_error(_prefixed(e, what))


def read_space_map(
    reader: BlockReader,
    root: SpaceMapRoot,
    walker: BtreeWalker,
    *,
    metadata: bool,
    on_error: ErrorSink = _raise,
    compact: bool = False,
) -> SpaceMap:
    """Decode every count of one space map.

    With the walker's ``meta_counts`` set, the map's own blocks (index, bitmaps, overflow
    nodes) are counted as references too. Unreadable bitmaps are reported and read as zeros.
    ``compact``: ``counts`` may be uint8 when no count comes from the ref-count tree (a
    reader that only compares them: a 10M-block map is then 10 MB, not 40).
    """
    what = "metadata space map" if metadata else "data space map"
    index_block: int | None
    if metadata:
        index = read_metadata_index(reader, root)
        index_block = root.bitmap_root
        walker._count(index_block)
    else:
        index = read_data_index(walker, root)
        index_block = None
    n = len(index)
    bitmaps = index["blocknr"].astype(np.int64)
    sound = _sound_payloads(reader, bitmaps)
    if sound is not None:
        payload = sound
        meta = walker.meta_counts
        if meta is not None:  # as walker._count(b) each (a block named twice counts twice)
            np.add.at(meta, bitmaps[bitmaps < len(meta)], meta.dtype.type(1))
    else:
        payload = np.zeros(n * (BLOCK_SIZE - BITMAP_HEADER_SIZE), np.uint8)
        stride = BLOCK_SIZE - BITMAP_HEADER_SIZE
        for i, b in enumerate(bitmaps.tolist()):
            walker._count(b)
            try:
                payload[i * stride : (i + 1) * stride] = read_bitmap_payload(
                    reader, b, _prefixing(on_error, f"{what} bitmap {i}"))
            except MetadataError as err:
                on_error(_prefixed(err, f"{what} bitmap {i}"))
    decoded = decode_bitmap(payload)
    counts = decoded[: root.nr_blocks]
    if not compact:
        counts = counts.astype(np.uint32)
    if n and np.any(decoded[root.nr_blocks:]):
        on_error(MetadataError(f"{what}: bitmap entries set beyond nr_blocks {root.nr_blocks}",
                               field=f"{what} bitmap {n - 1}"))
    ov_keys: list[np.ndarray] = []
    ov_vals: list[np.ndarray] = []

    def leaf(node: Node) -> None:
        ov_keys.append(node.keys)
        ov_vals.append(node.values("<u4"))

    walker.walk(root.ref_count_root, REF_COUNT_VALUE_SIZE, leaf, what=f"{what} ref-count tree")
    if not ov_keys and not _any_three(counts):
        return SpaceMap(root, counts, index, index_block)  # nothing below to check
    three = counts == 3
    if ov_keys:
        counts = counts.astype(np.uint32, copy=False)  # the tree's counts need the room
        keys = np.concatenate(ov_keys)
        vals = np.concatenate(ov_vals).astype(np.uint32)
        inside = keys < root.nr_blocks
        if not inside.all():
            on_error(MetadataError(f"{what}: ref-count tree has blocks beyond nr_blocks",
                                   block=root.ref_count_root, field="ref_count_root"))
        keys, vals = keys[inside].astype(np.int64), vals[inside]
        # Only a bitmap count of 3 sends the kernel's lookup to the tree, so an entry for a
        # block counted below 3 is never read by the kernel (nor by thin_check 0.9). thin_check
        # 1.1 takes such an entry's count as the block's: check may not be weaker, so in the
        # data space map an entry whose count differs from its bitmap's is damage (one that
        # agrees changes nothing 1.1 sees); in the metadata space map 1.1 refuses any.
        flagged = three[keys]
        stale = ~flagged
        if not metadata:
            stale &= vals != counts[keys]
        if stale.any():
            bad = int(keys[stale][0])
            on_error(MetadataError(
                f"{what}: ref-count tree holds block {bad} with count {int(vals[stale][0])}, "
                f"whose bitmap count is {int(counts[bad])} (below 3)", field="ref_count_root"))
        low = (vals < 3) & (flagged | metadata)
        if low.any():
            on_error(MetadataError(f"{what}: ref-count tree holds a count below 3 "
                                   f"(block {int(keys[low][0])})", field="ref_count_root"))
        counts[keys[flagged]] = vals[flagged]
        three[keys[flagged]] = False
    if three.any():
        bad = int(np.flatnonzero(three)[0])
        on_error(MetadataError(
            f"{what}: block {bad} has bitmap count 3 but no ref-count tree entry",
            field="ref_count_root"))
    return SpaceMap(root, counts, index, index_block)
