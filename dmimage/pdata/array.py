"""persistent-data's array (dm-array.c), read and written: a btree of array blocks, and the
bitset built on it.

The btree maps array-block index -> block location; every array block holds ``max_entries``
values of ``value_size`` bytes after a 24-byte header (format/cache.py). Only the last block
may be partly filled. Reading counts every array block in the walker's ``meta_counts``, as the
metadata space map must.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dmimage.errors import BlockNumberError, ChecksumError, FormatError, MetadataError
from dmimage.format.cache import ARRAY_BLOCK_HEADER, SALT_ARRAY_BLOCK
from dmimage.format.checksum import checksum_ok, seal
from dmimage.format.constants import BLOCK_SIZE
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import U64, BtreeWalker, Node

if TYPE_CHECKING:  # the writer is imported when something is written: readers skip it
    from dmimage.pdata.writer import MetadataImage


def max_entries(value_size: int) -> int:
    return (BLOCK_SIZE - ARRAY_BLOCK_HEADER.size) // value_size


@dataclass(frozen=True)
class ArrayContents:
    """The values of one array, ``values[i]`` the raw bytes of entry ``i``."""

    values: np.ndarray  # uint8, shape (nr_entries, value_size)
    #: array block locations in index order
    blocks: list[int]

    def __len__(self) -> int:
        return len(self.values)


def read_array(walker: BtreeWalker, root: int, value_size: int, what: str) -> ArrayContents:
    """Every entry of the array at ``root``; the first damage raises MetadataError."""
    keys: list[np.ndarray] = []
    locs: list[np.ndarray] = []

    def leaf(node: Node) -> None:
        keys.append(node.keys)
        locs.append(node.values(U64))

    summary = walker.walk(root, 8, leaf, what=f"{what} btree")
    if summary is None:
        raise MetadataError(f"{what}: btree root unusable", block=root)
    k = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    v = np.concatenate(locs) if locs else np.zeros(0, np.uint64)
    order = np.argsort(k, kind="stable")
    k, v = k[order], v[order]
    if len(k) and not np.array_equal(k, np.arange(len(k), dtype=k.dtype)):
        gap = int(np.flatnonzero(k != np.arange(len(k), dtype=k.dtype))[0])
        raise MetadataError(f"{what}: gaps in array indices (index {gap} missing)", block=root,
                            field="array btree")
    blocks = v.astype(np.int64)
    nb = len(blocks)
    if nb == 0:
        return ArrayContents(np.zeros((0, value_size), np.uint8), [])
    return ArrayContents(_array_values(walker, blocks, value_size, what), blocks.tolist())


#: An array block's header as numpy reads it (format/cache.py's ARRAY_BLOCK_HEADER).
_HEADER = np.dtype([("csum", "<u4"), ("max_entries", "<u4"), ("nr_entries", "<u4"),
                    ("value_size", "<u4"), ("blocknr", "<u8")])


def _array_values(walker: BtreeWalker, blocks: np.ndarray, value_size: int, what: str
                  ) -> np.ndarray:
    """The entries of array blocks ``blocks`` (in index order), validated all at once; the
    error raised is the one a block-by-block read would meet first."""
    reader = walker.reader
    nb = len(blocks)
    counts = walker.meta_counts
    inside = (blocks >= 0) & (blocks < reader.nr_blocks)
    if counts is not None:
        ok = inside & (blocks < len(counts))
        np.add.at(counts, blocks[ok], 1)
    if not inside.all():
        i = int(np.flatnonzero(~inside)[0])
        _array_block(walker, int(blocks[i]), what, i)  # raises: past the end
    every = np.frombuffer(reader.buffer(), np.uint8, reader.nr_blocks * BLOCK_SIZE)
    raw = every.reshape(-1, BLOCK_SIZE)[blocks]
    per = max_entries(value_size)
    sums = [checksum_ok(row, SALT_ARRAY_BLOCK) for row in raw]
    hdr = raw[:, :ARRAY_BLOCK_HEADER.size].copy().view(_HEADER).reshape(-1)
    nr = hdr["nr_entries"]
    bad = ~np.array(sums, bool) | (hdr["blocknr"] != blocks.astype(np.uint64)) | \
        (hdr["value_size"] != value_size) | (hdr["max_entries"] != per) | (nr > per)
    bad[:-1] |= nr[:-1] != per
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        _check_header(walker, int(blocks[i]), value_size, what, i, i + 1 == nb)
        raise AssertionError("array block rejected in bulk, accepted alone")
    off = ARRAY_BLOCK_HEADER.size
    last = int(nr[-1])
    values: np.ndarray = raw[:, off:off + per * value_size].reshape(nb * per, value_size)
    return values[:(nb - 1) * per + last]


def _check_header(walker: BtreeWalker, b: int, value_size: int, what: str, i: int,
                  is_last: bool) -> None:
    """Raise the first problem of array block ``i`` at ``b``, as a one-block read would."""
    raw = _array_block(walker, b, what, i)
    _csum, mx, nr, vs, blocknr = ARRAY_BLOCK_HEADER.unpack_from(raw)
    per = max_entries(value_size)
    if blocknr != b:
        raise BlockNumberError(f"{what}: array block {i} says it lives at block {blocknr}",
                               block=b, field="array block blocknr")
    if vs != value_size or mx != per:
        raise FormatError(f"{what}: array block {i} has value_size {vs}, max_entries {mx}; "
                          f"expected {value_size}, {per}", block=b, field="array block")
    if nr > mx or (not is_last and nr != mx):
        raise FormatError(f"{what}: array block {i} holds {nr} of {mx} entries"
                          + (" but is not the last block" if nr <= mx else ""),
                          block=b, field="array block nr_entries")


def _array_block(walker: BtreeWalker, b: int, what: str, i: int) -> memoryview:
    if not 0 <= b < walker.reader.nr_blocks:
        raise MetadataError(f"{what}: array block {i} at {b} lies past the end of the "
                            "metadata device", block=b, field="array btree value")
    raw = walker.reader.block(b)
    if not checksum_ok(raw, SALT_ARRAY_BLOCK):
        raise ChecksumError(f"{what}: array block {i}: bad checksum", block=b,
                            field="array block")
    return raw


def read_bitset(walker: BtreeWalker, root: int, nr_bits: int, what: str) -> np.ndarray:
    """A bitset (an array of u64 words) as ``nr_bits`` booleans."""
    arr = read_array(walker, root, 8, what)
    words = arr.values.reshape(-1).view("<u8") if len(arr) else np.zeros(0, "<u8")
    need = -(-nr_bits // 64)
    if len(words) < need:
        raise MetadataError(f"{what}: {len(words)} words hold fewer than {nr_bits} bits",
                            block=root, field="bitset")
    bits = np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little")
    return bits[:nr_bits].astype(bool)


@dataclass(frozen=True)
class SalvagedArray:
    """What could be read of an array: damaged parts are zero and not ``present``."""

    values: np.ndarray  # uint8, shape (nr_entries, value_size)
    present: np.ndarray  # bool per entry
    problems: list[str]

    def lost_runs(self, limit: int = 5) -> str:
        """The first ``limit`` lost index ranges, for a one-line message."""
        edges = np.flatnonzero(np.diff(np.concatenate([[1], self.present.astype(np.int8),
                                                       [1]])))
        runs = [f"{b}-{e - 1}" if e > b + 1 else str(b)
                for b, e in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True)]
        return ", ".join(runs[:limit]) + (", ..." if len(runs) > limit else "")


def salvage_array(reader: BlockReader, root: int, value_size: int, nr_entries: int,
                  what: str) -> SalvagedArray:
    """Every entry of the array at ``root`` that can still be read, for repair: a damaged
    btree node loses the array blocks under it, a damaged array block its own entries; the
    rest is kept in place (an entry's index is its position in the array). Never raises
    MetadataError: each loss is a line in ``problems``."""
    problems: list[str] = []
    walker = BtreeWalker(reader, on_error=lambda err: problems.append(str(err)))
    keys: list[np.ndarray] = []
    locs: list[np.ndarray] = []

    def leaf(node: Node) -> None:
        keys.append(node.keys.copy())
        locs.append(node.values(U64).copy())

    values = np.zeros((nr_entries, value_size), np.uint8)
    present = np.zeros(nr_entries, bool)
    per = max_entries(value_size)
    nr_array_blocks = -(-nr_entries // per)
    if root == 0 or walker.walk(root, 8, leaf, what=f"{what} btree") is None:
        if not problems:
            problems.append(f"{what}: no btree root")
        return SalvagedArray(values, present, problems)
    k = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    v = np.concatenate(locs) if locs else np.zeros(0, np.uint64)
    seen: set[int] = set()
    hdr = ARRAY_BLOCK_HEADER.size
    for i, b in zip(k.tolist(), v.tolist(), strict=True):
        if i >= nr_array_blocks or i in seen:
            problems.append(f"{what}: array block index {i} "
                            + ("given twice" if i in seen else "past the array's end"))
            continue
        seen.add(i)
        try:
            raw = _array_block(walker, b, what, i)
        except MetadataError as err:
            problems.append(str(err))
            continue
        _csum, mx, nr, vs, blocknr = ARRAY_BLOCK_HEADER.unpack_from(raw)
        want = min(per, nr_entries - i * per)
        if blocknr != b or vs != value_size or mx != per or nr != want:
            problems.append(f"block {b}: {what}: array block {i}: header (blocknr {blocknr}, "
                            f"value_size {vs}, max_entries {mx}, nr_entries {nr}) is not "
                            f"({b}, {value_size}, {per}, {want})")
            continue
        values[i * per:i * per + nr] = np.frombuffer(raw, np.uint8, nr * vs,
                                                     hdr).reshape(nr, vs)
        present[i * per:i * per + nr] = True
    missing = sorted(set(range(nr_array_blocks)) - seen)
    if missing and len(missing) == nr_array_blocks and not problems:
        problems.append(f"{what}: the btree holds no array blocks")
    return SalvagedArray(values, present, problems)


def write_array(image: MetadataImage, values: np.ndarray) -> int:
    """Write an array of ``values`` ((n, value_size) uint8) into ``image``: full array blocks
    (the last one partial), then the btree over them; returns the btree's root."""
    locs = image.alloc_many(nr_array_blocks(len(values), values.shape[1]))
    put_array_blocks(image, values, locs)
    return array_tree(image, locs)


def nr_array_blocks(nr_entries: int, value_size: int) -> int:
    return -(-nr_entries // max_entries(value_size))


def put_array_blocks(image: MetadataImage, values: np.ndarray, locs: np.ndarray) -> None:
    """The array blocks of ``values`` ((n, value_size) uint8), block i at ``locs[i]``
    (already allocated): every block full but the last."""
    vs = values.shape[1]
    per = max_entries(vs)
    nblocks = len(locs)
    blocks = np.zeros((nblocks, BLOCK_SIZE), np.uint8)
    hdr = ARRAY_BLOCK_HEADER.size
    for i, loc in enumerate(np.asarray(locs).tolist()):
        part = values[i * per:(i + 1) * per]
        row = blocks[i]
        ARRAY_BLOCK_HEADER.pack_into(row.data, 0, 0, per, len(part), vs, loc)
        row[hdr:hdr + part.size] = part.reshape(-1)
        seal(row, SALT_ARRAY_BLOCK)
    image.put(np.asarray(locs, np.int64), blocks)


def array_tree(image: MetadataImage, locs: np.ndarray) -> int:
    """The btree (array block index -> location) over an array's blocks; its root."""
    from dmimage.pdata.writer import MAPPING_LEAF, build_tree

    return build_tree(image, MAPPING_LEAF, np.arange(len(locs), dtype=np.uint64),
                      np.asarray(locs).astype(np.uint64))
