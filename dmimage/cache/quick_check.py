"""cache check's clean path: proves metadata clean with few imports, or gives up.

A cache check of 1M cache blocks has little work, so its start-up decides its speed. This
path walks the trees and array blocks with struct and the native crc32c over the mapped
device (pdata/block.py; no generic walker, array reader or space-map decoder), holds them
to a stricter shape than the full checker (cache/check.py), and checks the mapping values
with the full checker's own numpy rules (cache/mapping_rules.py). Every condition it
accepts implies that the full checker finds no problem, and it returns the same report
fields. Anything it does not accept (a problem, or only something unusual: a shared block,
an overflow count, a node header the kernel would not write) returns None, and the caller
runs the full checker, which names the problems. So this path never decides a verdict
other than "clean".

The metadata space map is checked as a whole: with every block referenced exactly once, its
bitmaps must equal, byte for byte, the bitmaps of that set of blocks.
"""

from __future__ import annotations

from array import array

from dmimage.cache.check_report import CacheCheckReport
from dmimage.cache.superblock import CacheSuperblock, parse_superblock
from dmimage.errors import MetadataError
from dmimage.format.cache import ARRAY_BLOCK_HEADER, SALT_ARRAY_BLOCK
from dmimage.format.checksum import crc32c
from dmimage.format.constants import (
    BITMAP_HEADER_SIZE,
    BLOCK_SIZE,
    BTREE_HEADER_SIZE,
    BTREE_INTERNAL,
    BTREE_LEAF,
    ENTRIES_PER_BITMAP,
    KEY_END,
    MAX_METADATA_BITMAPS,
    SALT_BITMAP,
    SALT_BTREE_NODE,
    SALT_METADATA_INDEX,
    max_entries,
)
from dmimage.format.layouts import BTREE_HEADER_STRUCT
from dmimage.pdata.block import BlockReader

#: As pdata/btree.py's walker: no real tree is deeper.
MAX_DEPTH = 12


def _sound(block: memoryview, salt: int) -> bool:
    """format/checksum.py's checksum_ok, inlined for a memoryview of a mapped block (3,000
    calls at 1M cache blocks)."""
    return crc32c(block[4:]) ^ 0xFFFFFFFF ^ salt == int.from_bytes(block[:4], "little")


class _Doubt(Exception):
    """Something the clean path does not prove clean: the full checker decides."""


def quick_check(path: str) -> CacheCheckReport | None:
    """The report of a clean check of ``path``, or None when the full checker must decide
    (damage, or a shape this path does not handle)."""
    try:
        with BlockReader(path) as reader:
            return _Checker(reader).run()
    except (_Doubt, MetadataError, IndexError, ValueError, OverflowError):
        return None


class _Checker:
    def __init__(self, reader: BlockReader):
        self.reader = reader
        #: every metadata block referenced once so far (a second reference: _Doubt)
        self.refs: set[int] = set()

    def ref(self, b: int) -> memoryview:
        if b in self.refs:
            raise _Doubt
        self.refs.add(b)
        return self.reader.block(b)

    def run(self) -> CacheCheckReport:
        sb = parse_superblock(self.reader.block(0))
        self.refs.add(0)
        rep = CacheCheckReport(version=sb.version, metadata_used=sb.metadata_sm.nr_allocated,
                               metadata_total=sb.metadata_sm.nr_blocks)
        dirty = None
        if sb.version >= 2:
            if sb.dirty_root == 0:
                raise _Doubt
            dirty = self.bitset(sb.dirty_root, sb.cache_blocks)
        data, _n = self.array(sb.mapping_root, 8)
        if sb.hint_root != 0 and sb.policy_hint_size != 0:
            if sb.policy_hint_size != 4:
                raise _Doubt
            self.array(sb.hint_root, 4)
        if sb.discard_root != 0:
            self.bitset(sb.discard_root, sb.discard_nr_blocks)
        self.space_map(sb)
        rep.nr_mappings, rep.nr_dirty = _mappings(sb, data, dirty)
        return rep

    def tree(self, root: int, value_size: int) -> list[tuple[memoryview, memoryview]]:
        """(keys, values) of every leaf in key order; the walker's rules, stricter."""
        leaves: list[tuple[memoryview, memoryview]] = []
        self.node(root, value_size, 0, KEY_END, True, 0, leaves)
        return leaves

    def node(self, b: int, vs: int, lo: int, hi: int, is_root: bool, depth: int,
             leaves: list[tuple[memoryview, memoryview]]) -> int:
        """Height of the subtree at ``b``; its leaves appended to ``leaves``."""
        if depth > MAX_DEPTH:
            raise _Doubt
        block = self.ref(b)
        if not _sound(block, SALT_BTREE_NODE):
            raise _Doubt
        _csum, flags, own, nr, mx, size, _pad = BTREE_HEADER_STRUCT.unpack_from(block)
        leaf = flags == BTREE_LEAF
        if own != b or not (leaf or flags == BTREE_INTERNAL) or size != (vs if leaf else 8) \
                or mx != max_entries(size) or nr > mx or (not is_root and nr < mx // 3) \
                or (not leaf and nr == 0):
            raise _Doubt
        keys = block[BTREE_HEADER_SIZE:BTREE_HEADER_SIZE + 8 * nr].cast("Q")
        if nr and (keys[0] < lo or keys[nr - 1] >= hi):
            raise _Doubt
        start = BTREE_HEADER_SIZE + 8 * mx
        values = block[start:start + size * nr]
        if leaf:
            leaves.append((keys, values))
            return 0
        bounds = keys.tolist()
        if any(a >= z for a, z in zip(bounds, bounds[1:], strict=False)):
            raise _Doubt
        bounds.append(hi)
        height = -1
        for i, child in enumerate(values.cast("Q").tolist()):
            h = self.node(child, vs, bounds[i], bounds[i + 1], False, depth + 1, leaves)
            if height not in (-1, h):
                raise _Doubt
            height = h
        return height + 1

    def array(self, root: int, value_size: int) -> tuple[bytes, int]:
        """The entries of the array at ``root`` as one byte string, and their number."""
        leaves = self.tree(root, 8)
        nb = sum(len(k) for k, _ in leaves)
        if b"".join(k for k, _ in leaves) != array("Q", range(nb)).tobytes():
            raise _Doubt  # the array's indices must be 0..nb-1
        hdr = ARRAY_BLOCK_HEADER.size
        per = (BLOCK_SIZE - hdr) // value_size
        parts: list[memoryview] = []
        # the loop of the clean path (3,000 blocks at 1M cache blocks): ref() and _sound()
        # inlined, the stored checksum taken from the header's unpack
        refs, block_at, unpack = self.refs, self.reader.block, ARRAY_BLOCK_HEADER.unpack_from
        seed = 0xFFFFFFFF ^ SALT_ARRAY_BLOCK
        i = 0
        for _keys, values in leaves:
            for b in values.cast("Q").tolist():
                if b in refs:
                    raise _Doubt
                refs.add(b)
                block = block_at(b)
                csum, mx, nr, size, own = unpack(block)
                i += 1
                if crc32c(block[4:]) ^ seed != csum or own != b or size != value_size or \
                        mx != per or nr > per or (i < nb and nr != per):
                    raise _Doubt
                parts.append(block[hdr:hdr + nr * value_size])
        data = b"".join(parts)
        return data, len(data) // value_size

    def bitset(self, root: int, nr_bits: int) -> bytes:
        """The words of the bitset at ``root`` (at least ``nr_bits`` bits)."""
        words, n = self.array(root, 8)
        if n < -(-nr_bits // 64):
            raise _Doubt
        return words

    def space_map(self, sb: CacheSuperblock) -> None:
        """The metadata space map must count each block referenced so far exactly once
        and nothing else: its bitmaps must be byte for byte those of that set."""
        root = sb.metadata_sm
        index = self.ref(root.bitmap_root)
        if not _sound(index, SALT_METADATA_INDEX) or \
                int.from_bytes(index[8:16], "little") != root.bitmap_root:
            raise _Doubt
        n = root.nr_bitmaps
        if n > MAX_METADATA_BITMAPS:
            raise _Doubt
        bitmaps = index[16:16 + 16 * n].cast("Q")[0::2].tolist()
        stored = []
        for b in bitmaps:
            block = self.ref(b)
            if not _sound(block, SALT_BITMAP) or \
                    int.from_bytes(block[8:16], "little") != b:
                raise _Doubt
            stored.append(block[BITMAP_HEADER_SIZE:])
        leaves = self.tree(root.ref_count_root, 4)
        if any(len(k) for k, _ in leaves):
            raise _Doubt  # counts of 3 and more: the full checker's business
        want = [bytearray(BLOCK_SIZE - BITMAP_HEADER_SIZE) for _ in bitmaps]
        for b in self.refs:
            if b >= root.nr_blocks:
                raise _Doubt
            entry = b % ENTRIES_PER_BITMAP
            # a count of 1: the odd bit of the block's pair (format: the even bit is high)
            want[b // ENTRIES_PER_BITMAP][entry >> 2] |= 2 << (2 * (entry & 3))
        if any(w != s for w, s in zip(want, stored, strict=True)):
            raise _Doubt


def _mappings(sb: CacheSuperblock, data: bytes, dirty_words: bytes | None) -> tuple[int, int]:
    """(mapped, dirty) cache blocks when the mapping array breaks none of the rules; _Doubt
    otherwise. The one step on whole arrays of values: numpy is imported here."""
    import numpy as np

    from dmimage.cache.mapping_rules import mapping_counts, mapping_problems

    maps = np.frombuffer(data, "<u8").astype(np.uint64, copy=False)
    dirty = None
    if dirty_words is not None:
        bits = np.unpackbits(np.frombuffer(dirty_words, np.uint8), bitorder="little")
        dirty = bits[:sb.cache_blocks].astype(bool)
    if mapping_problems(sb, maps, dirty):
        raise _Doubt
    return mapping_counts(maps, dirty)
