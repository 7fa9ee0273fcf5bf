"""A btree's leaves in key order, a batch at a time: strict walks whose memory is one batch.

:func:`leaves_in_order` (pdata/btree.py) returns every leaf of a tree as a :class:`Node`:
fine for a small tree, but a pool of 100M mappings has about a million leaves. Here internal
nodes are walked one by one as before, while the leaves under each bottom internal node
(up to 252 of them) are read and validated together with numpy: headers, fill, key order
and key range for the whole group in a handful of array operations, checksums with the native
crc32c one block each. Any problem sends the tree back through :func:`leaves_in_order`,
which raises exactly the error the one-node-at-a-time walk raises, so the strict readers'
messages do not change.

Leaves are handed out as :class:`LeafBatch` (block numbers, entry counts, keys and u64 values
gathered from the metadata mmap in one fancy index each), about :data:`BATCH_LEAVES` at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dmimage.errors import MetadataError
from dmimage.format.checksum import crc32c
from dmimage.format.constants import (
    BLOCK_SIZE,
    BTREE_HEADER_SIZE,
    BTREE_LEAF,
    KEY_END,
    KEY_SIZE,
    SALT_BTREE_NODE,
)
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import (
    MAX_DEPTH,
    U64,
    _prefixed,
    fill_problem,
    leaves_in_order,
    order_problem,
    read_node,
)

__all__ = ["BATCH_LEAVES", "LeafBatch", "checksums_match", "gather_leaves", "leaf_batches",
           "leaf_blocks", "leaf_values", "validated_leaves"]

#: Leaves per batch (up to 252 mappings each: at most ~64,000 mappings, ~0.5 MB an array).
BATCH_LEAVES = 256
_WORDS = BLOCK_SIZE // 8
_HDR_WORDS = BTREE_HEADER_SIZE // 8
_U32_WORDS = BLOCK_SIZE // 4
_I64 = np.dtype(np.int64)


@dataclass(slots=True)
class LeafBatch:
    """Consecutive leaves of one tree (key order): their entries concatenated."""

    blocks: np.ndarray  # int64 leaf block numbers
    counts: np.ndarray  # int64 entries of each leaf
    keys: np.ndarray  # u64, or empty when not asked for
    values: np.ndarray  # u64 (8-byte values), or empty when not asked for
    #: each non-empty leaf's first and last key (u64; :func:`validated_leaves` only)
    first: np.ndarray | None = None
    last: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def concat(parts: list[LeafBatch]) -> LeafBatch:
        if len(parts) == 1:
            return parts[0]
        return LeafBatch(*(np.concatenate([getattr(p, f) for p in parts])
                           for f in ("blocks", "counts", "keys", "values")))


def _words(reader: BlockReader) -> np.ndarray:
    """The whole device as u64 words (a view of the mmap, no copy)."""
    return np.frombuffer(reader.buffer(), U64, reader.nr_blocks * _WORDS)


def _entry_index(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Word indexes ``starts[i] + j`` for ``j < counts[i]``, all leaves concatenated."""
    total = int(counts.sum())
    before = np.cumsum(counts) - counts
    index: np.ndarray = np.arange(total, dtype=_I64) + np.repeat(starts - before, counts)
    return index


def gather_leaves(reader: BlockReader, blocks: np.ndarray, *, values: bool = True
                  ) -> LeafBatch:
    """Keys (and u64 values) of leaves already validated, straight from the mmap. Leaves
    of one max_entries (as thin_restore and the kernel write them) go in one gather of the
    key (value) columns of their rows, not an index array per entry."""
    words = _words(reader)
    blocks = np.asarray(blocks, _I64)
    base = blocks * _WORDS
    hdr = words[base + 2]  # nr_entries (low half), max_entries (high half)
    counts = (hdr & np.uint64(0xFFFFFFFF)).astype(_I64)
    maxes = hdr >> np.uint64(32)
    m = int(maxes[0]) if len(blocks) else 0
    if len(blocks) and bool((maxes == np.uint64(m)).all()):
        rows = words.reshape(reader.nr_blocks, _WORDS)
        used = None if bool((counts == m).all()) else np.arange(m) < counts[:, None]

        def columns(first: int) -> np.ndarray:
            cols: np.ndarray = rows[blocks, first:first + m]
            return cols.reshape(-1) if used is None else cols[used]

        return LeafBatch(blocks, counts, columns(_HDR_WORDS),
                         columns(_HDR_WORDS + m) if values else np.empty(0, U64))
    keys = words[_entry_index(base + _HDR_WORDS, counts)]
    if not values:
        return LeafBatch(blocks, counts, keys, np.empty(0, U64))
    vals = words[_entry_index(base + _HDR_WORDS + maxes.astype(_I64), counts)]
    return LeafBatch(blocks, counts, keys, vals)


def leaf_values(reader: BlockReader, blocks: np.ndarray) -> np.ndarray:
    """The u64 values of leaves already validated, concatenated in order (a fresh array).
    Leaves of one max_entries (every tree thin_restore or the kernel writes) go in one
    gather of the value columns of their rows, not one index per entry."""
    words = _words(reader)
    blocks = np.asarray(blocks, _I64)
    if not len(blocks):
        return np.empty(0, U64)
    hdr = words[blocks * _WORDS + 2]  # nr_entries (low half), max_entries (high half)
    nr = (hdr & np.uint64(0xFFFFFFFF)).astype(_I64)
    mx = hdr >> np.uint64(32)
    m = int(mx[0])
    if not bool((mx == np.uint64(m)).all()):
        mixed: np.ndarray = words[_entry_index(blocks * _WORDS + _HDR_WORDS + mx.astype(_I64),
                                               nr)]
        return mixed
    cols = words.reshape(reader.nr_blocks, _WORDS)[blocks, _HDR_WORDS + m:_HDR_WORDS + 2 * m]
    if bool((nr == m).all()):
        return cols.reshape(-1)
    out: np.ndarray = cols[np.arange(m) < nr[:, None]]
    return out


def checksums_match(reader: BlockReader, blocks: np.ndarray, salt: int) -> bool:
    """Whether every block in ``blocks`` (in range) carries the checksum of a block of type
    ``salt``: one native crc32c call per block in one comprehension, compared with the
    stored checksums gathered in one fancy index (no per-block Python helpers: at 10M
    mappings a check validates 40,000 leaves)."""
    view = reader.buffer()
    crc = crc32c
    ends = ((blocks + 1) * BLOCK_SIZE).tolist()
    got = np.fromiter([crc(view[e - BLOCK_SIZE + 4:e]) for e in ends], np.uint32, len(ends))
    stored = np.frombuffer(view, np.uint32, reader.nr_blocks * _U32_WORDS)[blocks * _U32_WORDS]
    return bool(np.array_equal(got ^ np.uint32(0xFFFFFFFF ^ salt), stored))


def validated_leaves(reader: BlockReader, blocks: np.ndarray, lo: np.ndarray, hi_last: int, *,
                     root: bool, value_size: int, values: bool = True, keys: bool = True
                     ) -> LeafBatch | None:
    """Validate sibling leaves (children of one internal node, or a root leaf) as
    read_node, fill_problem and order_problem would; None on the first doubt. ``lo``: each
    leaf's lowest allowed key (the parent's keys), ``hi_last``: one past the last leaf's
    highest; ``root``: no fill rule. ``values=False`` / ``keys=False``: the batch's values /
    keys are left empty (a caller that reads them later, or elsewhere, by block number);
    ``first`` and ``last`` are always set."""
    words = _words(reader)
    nblocks = reader.nr_blocks
    n = len(blocks)
    b0 = int(blocks[0])
    if int(blocks.min()) < 0 or int(blocks.max()) >= nblocks:
        return None
    if not checksums_match(reader, blocks, SALT_BTREE_NODE):
        return None
    if int(blocks[-1]) - b0 == n - 1 and bool((np.diff(blocks) == 1).all()):
        # consecutive blocks (as thin_restore lays out leaves): a view of the mapping
        rows = words.reshape(nblocks, _WORDS)[b0:b0 + n]
    else:
        # the whole blocks copied out in one row gather (a few hundred KiB): headers, keys
        # and values are then columns of it, not one fancy index per field
        rows = words.reshape(nblocks, _WORDS)[blocks]
    w0, w1, w2, w3 = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    flags = w0 >> np.uint64(32)
    nr = (w2 & np.uint64(0xFFFFFFFF)).astype(_I64)
    mx = (w2 >> np.uint64(32)).astype(_I64)
    vs = (w3 & np.uint64(0xFFFFFFFF)).astype(_I64)
    ok = (flags == BTREE_LEAF) & (w1 == blocks.astype(U64)) & (vs == value_size)
    ok &= (mx % 3 == 0) & (BTREE_HEADER_SIZE + (KEY_SIZE + value_size) * mx <= BLOCK_SIZE)
    ok &= nr <= mx
    if not root:
        ok &= nr >= mx // 3
    if not bool(ok.all()):
        return None
    m = int(mx[0])
    if not bool((mx == m).all()):
        got = _mixed_leaves(words, blocks, nr, mx, lo, hi_last, value_size if values else 0)
        if got is not None and not keys:
            got.keys = np.empty(0, U64)
        return got
    kk = rows[:, _HDR_WORDS:_HDR_WORDS + m]
    vv = rows[:, _HDR_WORDS + m:_HDR_WORDS + 2 * m]
    want_vals = value_size == 8 and values
    empty = np.empty(0, U64)
    if m and bool((nr == m).all()):  # every leaf full: no masks
        if m > 1 and not bool((kk[:, 1:] > kk[:, :-1]).all()):
            return None
        first, last = kk[:, 0].copy(), kk[:, m - 1].copy()
        if not _in_ranges(first, last, np.ones(n, bool), lo, hi_last):
            return None
        return LeafBatch(blocks, nr, kk.reshape(-1) if keys else empty,
                         vv.reshape(-1) if want_vals else empty, first, last)
    used = np.arange(m) < nr[:, None]  # (leaves, max_entries): the entries in use
    full = nr > 0
    at = np.flatnonzero(full)
    first, last = kk[at, 0], kk[at, nr[at] - 1]
    if len(at):
        if m > 1 and not bool((kk[:, 1:] > kk[:, :-1])[used[:, 1:]].all()):
            return None
        if not _in_ranges(first, last, full, lo, hi_last):
            return None
    return LeafBatch(blocks, nr, kk[used] if keys else empty, vv[used] if want_vals else empty,
                     first, last)


def _in_ranges(first: np.ndarray, last: np.ndarray, full: np.ndarray, lo: np.ndarray,
               hi_last: int) -> bool:
    """Each non-empty leaf's keys (``first``..``last``, one per leaf where ``full``) inside
    [its ``lo``, the next leaf's ``lo``), the last leaf's below ``hi_last``."""
    if bool((first < lo[full]).any()):
        return False
    his = np.append(lo[1:], np.uint64(0))
    bounded = full.copy()
    if hi_last >= KEY_END:
        bounded[-1] = False
    else:
        his[-1] = np.uint64(hi_last)
    return not bool((last[bounded[full]] >= his[bounded]).any())


def _mixed_leaves(words: np.ndarray, blocks: np.ndarray, nr: np.ndarray, mx: np.ndarray,
                  lo: np.ndarray, hi_last: int, value_size: int) -> LeafBatch | None:
    """:func:`validated_leaves`' key and value checks for sibling leaves of different
    max_entries (headers already checked): entries gathered one index per entry."""
    base = blocks * _WORDS
    keys = words[_entry_index(base + _HDR_WORDS, nr)]
    n = len(keys)
    ends = np.cumsum(nr)
    starts = ends - nr
    full = nr > 0
    first, last = keys[starts[full]], keys[ends[full] - 1]
    if n:
        if n > 1:
            up = keys[1:] > keys[:-1]
            inner = np.ones(n - 1, bool)
            inner[(starts[full & (starts > 0)] - 1)] = False  # leaf boundaries
            if not bool((up | ~inner).all()):
                return None
        if not _in_ranges(first, last, full, lo, hi_last):
            return None
    vals = words[_entry_index(base + _HDR_WORDS + mx, nr)] if value_size == 8 else \
        np.empty(0, U64)
    return LeafBatch(blocks, nr, keys, vals, first, last)


def leaf_batches(reader: BlockReader, root: int, value_size: int, what: str = "btree", *,
                 batch: int | None = None, entries: bool = True) -> Iterator[LeafBatch]:
    """Every leaf of the tree at ``root`` in key order, about ``batch`` leaves at a time
    (default :data:`BATCH_LEAVES`), validated strictly (the first problem raises, as
    :func:`leaves_in_order` does).

    ``values`` of a batch are the u64 leaf values when ``value_size`` is 8 (else empty);
    ``entries=False``: batches of sibling leaves come without keys and values (block
    numbers and counts for a caller that reads them later).
    """
    batch = batch or BATCH_LEAVES
    pending: list[LeafBatch] = []
    npending = 0
    leaf_depth = -1  # every leaf must be at the same depth

    def fail() -> MetadataError:
        leaves_in_order(reader, root, value_size, what)  # raises the precise error
        return MetadataError(f"{what}: a leaf failed validation", block=root)

    def group(blocks: np.ndarray, lo: np.ndarray, hi: int, is_root: bool, depth: int) -> None:
        nonlocal npending, leaf_depth
        if depth > MAX_DEPTH or leaf_depth not in (-1, depth):
            raise fail()
        leaf_depth = depth
        got = validated_leaves(reader, blocks, lo, hi, root=is_root, value_size=value_size,
                               values=entries, keys=entries)
        if got is None:
            raise fail()
        pending.append(got)
        npending += len(blocks)

    def walk(blocknr: int, lo: int, hi: int, depth: int, is_root: bool
             ) -> Iterator[LeafBatch]:
        nonlocal npending
        if depth > MAX_DEPTH:
            raise MetadataError(f"{what}: tree deeper than {MAX_DEPTH} levels (a cycle?)",
                                block=blocknr)
        try:
            node = read_node(reader, blocknr, value_size)
        except MetadataError as err:
            raise _prefixed(err, what) from None
        problem = fill_problem(node, is_root, what) or order_problem(node, lo, hi, what)
        if problem is not None:
            raise problem
        if node.is_leaf:
            group(np.array([blocknr], _I64), np.array([lo], U64), hi, is_root, depth)
            return
        children = node.values(U64).astype(_I64)
        first = int(children[0])
        if 0 <= first < reader.nr_blocks and reader.block(first)[4] == BTREE_LEAF:
            group(children, node.keys.copy(), hi, False, depth + 1)
            if npending >= batch:
                reader.drop_pages(min(int(p.blocks.min()) for p in pending),
                                  max(int(p.blocks.max()) for p in pending))
                yield LeafBatch.concat(pending)
                pending.clear()
                npending = 0
            return
        key_list = node.keys.tolist()
        nr = len(key_list)
        for i, child in enumerate(children.tolist()):
            child_hi = key_list[i + 1] if i + 1 < nr else hi
            yield from walk(child, key_list[i], child_hi, depth + 1, False)

    yield from walk(root, 0, KEY_END, 0, True)
    if pending:
        yield LeafBatch.concat(pending)


def leaf_blocks(reader: BlockReader, root: int, value_size: int, what: str = "btree", *,
                batch: int | None = None) -> np.ndarray:
    """Block numbers (int64) of every leaf of one tree in key order, validated strictly
    ``batch`` leaves at a time (:func:`leaf_batches`)."""
    parts = [b.blocks for b in leaf_batches(reader, root, value_size, what, batch=batch,
                                            entries=False)]
    return np.concatenate(parts) if parts else np.empty(0, _I64)
