"""Metadata damage generators (oracle side; independent of ``dmimage``).

Every function takes the metadata image as bytes/bytearray (never modified) and returns a
:class:`Damaged` with a fresh bytearray and a description.  Block roles are found by a small
walk from the superblock (thin-format.md §2-§4); block *types* by the checksum-salt trick of §1.

Facts used:
* checksum = crc32c(block[4:4096]) ^ 0xFFFFFFFF ^ salt (standard crc32c), stored LE u32 at 0;
* salts: superblock 160774, btree node 121107, bitmap 240779, metadata index 160478;
* blocknr at offset 8 for every block type;
* btree header: flags@4 (1 internal, 2 leaf), nr_entries@16, max_entries@20, value_size@24,
  keys at 32, values at 32 + 8*max_entries;
* superblock: data SM root @64, metadata SM root @192 (nr_blocks, nr_allocated, bitmap_root,
  ref_count_root), data_mapping_root @320, device_details_root @328;
* bitmap entries 2 bits each from byte 16, entry e in LE u64 word e//32, bit 2j = high, 2j+1 = low.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

import crc32c as _crc
import numpy as np

__all__ = [
    "BLOCK",
    "SALTS",
    "Damaged",
    "MetaMap",
    "checksum",
    "block_salt",
    "block_type",
    "fix_checksum",
    "scan",
    "data_counts",
    "meta_counts",
    "flip_byte",
    "wrong_blocknr",
    "wrong_nr_allocated",
    "leaked_block",
    "missing_reference",
    "cycle",
    "out_of_range_pointer",
    "truncate",
    "all_damage",
]

BLOCK = 4096
SALT_SUPERBLOCK = 160774
SALT_BTREE = 121107
SALT_BITMAP = 240779
SALT_INDEX = 160478
SALTS = {
    SALT_SUPERBLOCK: "superblock",
    SALT_BTREE: "btree",
    SALT_BITMAP: "bitmap",
    SALT_INDEX: "index",
}


@dataclass
class Damaged:
    data: bytearray
    description: str
    kind: str  # short machine id, e.g. "flip:btree_leaf:nofix"
    block: int | None = None


def checksum(block: bytes, salt: int) -> int:
    """The value to store at offset 0 of *block* (4096 bytes) for *salt*."""
    return (_crc.crc32c(bytes(block[4:BLOCK])) ^ 0xFFFFFFFF ^ salt) & 0xFFFFFFFF


def block_salt(block: bytes) -> int:
    """The salt that makes the stored checksum valid (identifies the block type)."""
    stored = struct.unpack_from("<I", block, 0)[0]
    return (_crc.crc32c(bytes(block[4:BLOCK])) ^ 0xFFFFFFFF ^ stored) & 0xFFFFFFFF


def block_type(block: bytes) -> str | None:
    """'superblock' | 'btree_internal' | 'btree_leaf' | 'bitmap' | 'index' | None."""
    if not any(block[:BLOCK]):
        return None
    t = SALTS.get(block_salt(block))
    if t == "btree":
        flags = struct.unpack_from("<I", block, 4)[0]
        return "btree_leaf" if flags == 2 else "btree_internal"
    return t


def _blk(meta, b: int) -> memoryview:
    return memoryview(meta)[b * BLOCK : (b + 1) * BLOCK]


def fix_checksum(meta: bytearray, b: int, salt: int) -> None:
    blk = _blk(meta, b)
    struct.pack_into("<I", meta, b * BLOCK, checksum(blk, salt))


def _u64(meta, off) -> int:
    return struct.unpack_from("<Q", meta, off)[0]


def _u32(meta, off) -> int:
    return struct.unpack_from("<I", meta, off)[0]


@dataclass
class Node:
    block: int
    role: str  # top | bottom | details | data_index | data_refcount | meta_refcount
    internal: bool
    depth: int
    parent: int | None
    nr_entries: int
    max_entries: int
    value_size: int


class MetaMap:
    """Roles of the blocks of a (valid) metadata image, found by walking from the superblock."""

    def __init__(self, meta: bytes):
        self.meta = meta
        self.nr_blocks_file = len(meta) // BLOCK
        sb = 0
        self.data_sm = struct.unpack_from("<QQQQ", meta, sb + 64)
        self.meta_sm = struct.unpack_from("<QQQQ", meta, sb + 192)
        self.mapping_root = _u64(meta, 320)
        self.details_root = _u64(meta, 328)
        self.nodes: dict[int, Node] = {}
        self.bitmaps: dict[int, str] = {}  # block -> 'data' | 'meta'
        self.data_bitmaps: list[int] = []  # in index-key order
        self.meta_index = self.meta_sm[2]
        self._walk(self.mapping_root, "top")
        self._walk(self.details_root, "details")
        self._walk(self.data_sm[2], "data_index")
        self._walk(self.data_sm[3], "data_refcount")
        self._walk(self.meta_sm[3], "meta_refcount")
        # metadata index block -> bitmaps
        n_bm = -(-self.meta_sm[0] // 16320)
        self.meta_bitmaps = []
        for i in range(min(n_bm, 255)):
            bm = _u64(meta, self.meta_index * BLOCK + 16 + 16 * i)
            if bm == 0:
                break
            self.meta_bitmaps.append(bm)
            self.bitmaps[bm] = "meta"

    def _walk(self, root: int, role: str) -> None:
        meta = self.meta
        q = deque([(root, role, 0, None)])
        while q:
            b, r, depth, parent = q.popleft()
            if b in self.nodes and self.nodes[b].role == r:
                continue  # shared node
            off = b * BLOCK
            (flags,) = struct.unpack_from("<I", meta, off + 4)
            nr, mx, vs = struct.unpack_from("<III", meta, off + 16)
            internal = flags != 2
            self.nodes[b] = Node(b, r, internal, depth, parent, nr, mx, vs)
            voff = off + 32 + 8 * mx
            if internal:
                for i in range(nr):
                    q.append((_u64(meta, voff + 8 * i), r, depth + 1, b))
            elif r == "top":
                for i in range(nr):
                    q.append((_u64(meta, voff + 8 * i), "bottom", 0, b))
            elif r == "data_index":
                for i in range(nr):
                    bm = _u64(meta, voff + 16 * i)
                    self.bitmaps[bm] = "data"
                    self.data_bitmaps.append(bm)

    # -- queries
    def nodes_where(self, role: str | None = None, internal: bool | None = None) -> list[Node]:
        out = [
            n
            for n in self.nodes.values()
            if (role is None or n.role == role) and (internal is None or n.internal == internal)
        ]
        return sorted(out, key=lambda n: n.block)

    def used_blocks(self) -> set[int]:
        s = {0, self.meta_index, *self.nodes, *self.bitmaps}
        return s

    def meta_count(self, b: int) -> int:
        bm = self.meta_bitmaps[b // 16320]
        e = b % 16320
        word = _u64(self.meta, bm * BLOCK + 16 + 8 * (e // 32))
        j = e % 32
        return (((word >> (2 * j)) & 1) << 1) | ((word >> (2 * j + 1)) & 1)


def _decode_counts(meta, bitmaps: list[int], n: int, overflow_root: int) -> np.ndarray:
    out = np.zeros(len(bitmaps) * 16320, dtype=np.uint32)
    for i, bm in enumerate(bitmaps):
        raw = np.frombuffer(bytes(meta[bm * BLOCK + 16 : (bm + 1) * BLOCK]), dtype=np.uint8)
        bits = np.unpackbits(raw, bitorder="little").reshape(-1, 2)  # [bit 2j, bit 2j+1]
        out[i * 16320 : (i + 1) * 16320] = (bits[:, 0].astype(np.uint32) << 1) | bits[:, 1]
    out = out[:n]
    # overflow tree (leaves only, any depth)
    stack = [overflow_root]
    while stack:
        b = stack.pop()
        off = b * BLOCK
        (flags,) = struct.unpack_from("<I", meta, off + 4)
        nr, mx, vs = struct.unpack_from("<III", meta, off + 16)
        keys = struct.unpack_from(f"<{nr}Q", meta, off + 32)
        if flags != 2:
            stack.extend(struct.unpack_from(f"<{nr}Q", meta, off + 32 + 8 * mx))
        else:
            vals = struct.unpack_from(f"<{nr}I", meta, off + 32 + 8 * mx)
            for k, v in zip(keys, vals, strict=True):
                if k < n:
                    out[k] = v
    return out


def data_counts(meta: bytes) -> np.ndarray:
    """Decode the data space map (bitmaps + overflow tree) into a count per data block."""
    mm = MetaMap(meta)
    return _decode_counts(meta, mm.data_bitmaps, mm.data_sm[0], mm.data_sm[3])


def meta_counts(meta: bytes) -> np.ndarray:
    """Decode the metadata space map into a count per metadata block."""
    mm = MetaMap(meta)
    return _decode_counts(meta, mm.meta_bitmaps, mm.meta_sm[0], mm.meta_sm[3])


def scan(meta: bytes) -> dict[int, str]:
    """block number -> block_type for every non-zero block (salt sniffing only)."""
    out = {}
    for b in range(len(meta) // BLOCK):
        t = block_type(_blk(meta, b))
        if t:
            out[b] = t
    return out


# ----------------------------------------------------------------------------- helpers

_SALT_OF = {
    "superblock": SALT_SUPERBLOCK,
    "btree_internal": SALT_BTREE,
    "btree_leaf": SALT_BTREE,
    "bitmap": SALT_BITMAP,
    "index": SALT_INDEX,
}


def _pick(meta: bytes, kind: str, role: str | None = None, which: int = 0) -> int:
    """Block number of the which-th block of *kind* (optionally of a btree *role*)."""
    if kind == "superblock":
        return 0
    mm = MetaMap(meta)
    if kind == "index":
        return mm.meta_index
    if kind == "bitmap":
        cands = sorted(b for b, r in mm.bitmaps.items() if role is None or r == role)
    elif kind in ("btree_internal", "btree_leaf"):
        cands = [n.block for n in mm.nodes_where(role, kind == "btree_internal")]
    else:
        raise ValueError(kind)
    if not cands:
        raise LookupError(f"no {kind} block (role {role}) in this metadata")
    return cands[which % len(cands)]


# default byte to flip when the checksum is recomputed: a field whose change is fatal
_FATAL_OFFSET = {
    "superblock": 328,  # device_details_root low byte
    "btree_internal": 24,  # value_size
    "btree_leaf": 24,  # value_size
    "bitmap": 16,  # first 4 entries (superblock's count)
    "index": 16,  # first bitmap's block number
}


def flip_byte(
    meta: bytes,
    kind: str,
    *,
    fix_csum: bool = False,
    offset: int | None = None,
    role: str | None = None,
    which: int = 0,
    xor: int = 0xFF,
) -> Damaged:
    """XOR one byte of a block of *kind* ('superblock', 'btree_internal', 'btree_leaf',
    'bitmap', 'index'; *role* narrows btree nodes: top/bottom/details/data_index/
    data_refcount/meta_refcount, or bitmaps: data/meta).  Without fix_csum the default offset
    is 2000 (checksum now wrong); with fix_csum a fatal header field is hit and the checksum
    recomputed."""
    out = bytearray(meta)
    b = _pick(out, kind, role, which)
    if offset is None:
        offset = _FATAL_OFFSET[kind] if fix_csum else 2000
    out[b * BLOCK + offset] ^= xor
    if fix_csum:
        fix_checksum(out, b, _SALT_OF[kind])
    return Damaged(
        out,
        f"flip byte {offset} of {kind}{'/' + role if role else ''} block {b}"
        f"{' (checksum recomputed)' if fix_csum else ' (checksum now wrong)'}",
        f"flip:{kind}{':' + role if role else ''}:{'fix' if fix_csum else 'nofix'}",
        b,
    )


def wrong_blocknr(
    meta: bytes, kind: str, *, role: str | None = None, which: int = 0, delta: int = 1
) -> Damaged:
    """Change the blocknr field (offset 8) and recompute a valid checksum."""
    out = bytearray(meta)
    b = _pick(out, kind, role, which)
    struct.pack_into("<Q", out, b * BLOCK + 8, b + delta)
    fix_checksum(out, b, _SALT_OF[kind])
    return Damaged(
        out,
        f"{kind}{'/' + role if role else ''} block {b}: blocknr field = "
        f"{b + delta}, checksum valid",
        f"blocknr:{kind}{':' + role if role else ''}",
        b,
    )


def wrong_nr_allocated(meta: bytes, sm: str = "metadata", delta: int = 1) -> Damaged:
    """Change nr_allocated of the data or metadata SM root in the superblock (checksum fixed)."""
    out = bytearray(meta)
    off = (192 if sm == "metadata" else 64) + 8
    v = _u64(out, off)
    struct.pack_into("<Q", out, off, max(0, v + delta))
    fix_checksum(out, 0, SALT_SUPERBLOCK)
    return Damaged(out, f"{sm} SM nr_allocated {v} -> {max(0, v + delta)}", f"nr_allocated:{sm}", 0)


def _set_meta_count(out: bytearray, mm: MetaMap, b: int, count: int) -> int:
    bm = mm.meta_bitmaps[b // 16320]
    e = b % 16320
    off = bm * BLOCK + 16 + 8 * (e // 32)
    j = e % 32
    word = _u64(out, off)
    word &= ~(3 << (2 * j))
    word |= ((count >> 1) & 1) << (2 * j) | (count & 1) << (2 * j + 1)
    struct.pack_into("<Q", out, off, word)
    fix_checksum(out, bm, SALT_BITMAP)
    return bm


def leaked_block(meta: bytes, count: int = 1) -> Damaged:
    """Give an unreferenced (free) metadata block a bitmap count (1 = a 'leak'), checksum fixed.
    nr_allocated and the index hints are left alone (neither checker looks at them)."""
    out = bytearray(meta)
    mm = MetaMap(out)
    used = mm.used_blocks()
    n = min(mm.meta_sm[0], mm.nr_blocks_file)
    free = next(b for b in range(1, n) if b not in used and mm.meta_count(b) == 0)
    bm = _set_meta_count(out, mm, free, count)
    return Damaged(
        out,
        f"metadata block {free} unreferenced but bitmap {bm} says count {count}",
        f"leak:{count}",
        free,
    )


def missing_reference(meta: bytes, role: str = "bottom") -> Damaged:
    """Drop the last child of an internal node (of *role*) that has >= 2 entries: its subtree
    stays allocated but unreferenced and the device loses mappings (checksum fixed)."""
    out = bytearray(meta)
    mm = MetaMap(out)
    cands = [
        n
        for n in mm.nodes_where(role, True)
        if n.nr_entries >= 2 and (n.depth == 0 or n.nr_entries - 1 >= n.max_entries // 3)
    ]
    if not cands:
        raise LookupError(f"no internal {role} node with >= 2 entries")
    n = cands[0]
    off = n.block * BLOCK
    child = _u64(out, off + 32 + 8 * n.max_entries + 8 * (n.nr_entries - 1))
    struct.pack_into("<I", out, off + 16, n.nr_entries - 1)
    struct.pack_into("<Q", out, off + 32 + 8 * (n.nr_entries - 1), 0)
    struct.pack_into("<Q", out, off + 32 + 8 * n.max_entries + 8 * (n.nr_entries - 1), 0)
    fix_checksum(out, n.block, SALT_BTREE)
    return Damaged(
        out,
        f"{role} internal node {n.block} lost its last child {child} (subtree unreferenced)",
        f"missing_ref:{role}",
        n.block,
    )


def cycle(meta: bytes, role: str = "bottom", to: str = "nearest") -> Damaged:
    """Make an internal node's last child pointer point at an ancestor (checksum fixed).

    to="nearest": the node's internal parent of the same role if the tree is deep enough,
    else the node itself (self-loop).  to="top": for role "bottom", the top-level mapping leaf
    that names this bottom tree (a loop across the two levels)."""
    out = bytearray(meta)
    mm = MetaMap(out)
    cands = [n for n in mm.nodes_where(role, True) if n.nr_entries >= 1]
    if not cands:
        raise LookupError(f"no internal {role} node")
    n = cands[0]
    ancestor = n.block
    deeper = [
        c
        for c in cands
        if c.parent is not None
        and c.parent in mm.nodes
        and mm.nodes[c.parent].internal
        and mm.nodes[c.parent].role == role
    ]
    if to == "top":
        roots = [c for c in cands if c.depth == 0 and c.parent is not None]
        if not roots:
            raise LookupError("no internal bottom root")
        n, ancestor = roots[0], roots[0].parent
    elif deeper:
        n, ancestor = deeper[0], deeper[0].parent
    off = n.block * BLOCK
    slot = n.nr_entries - 1
    struct.pack_into("<Q", out, off + 32 + 8 * n.max_entries + 8 * slot, ancestor)
    fix_checksum(out, n.block, SALT_BTREE)
    return Damaged(
        out,
        f"{role} internal node {n.block}: child {slot} -> ancestor {ancestor}",
        f"cycle:{role}:{to}",
        n.block,
    )


def out_of_range_pointer(meta: bytes, role: str = "bottom", target: int | None = None) -> Damaged:
    """Point a child (internal node, or a top-level leaf's subtree root when role='top')
    beyond the metadata device (checksum fixed)."""
    out = bytearray(meta)
    mm = MetaMap(out)
    if target is None:
        target = max(mm.meta_sm[0], mm.nr_blocks_file) + 1000
    if role == "top":
        cands = [n for n in mm.nodes_where("top", False) if n.nr_entries >= 1]
    else:
        cands = [n for n in mm.nodes_where(role, True) if n.nr_entries >= 1]
    if not cands:
        raise LookupError(f"no {role} node with a child pointer")
    n = cands[0]
    off = n.block * BLOCK
    struct.pack_into("<Q", out, off + 32 + 8 * n.max_entries, target)
    fix_checksum(out, n.block, SALT_BTREE)
    return Damaged(
        out,
        f"{role} node {n.block}: first pointer -> {target} (beyond device)",
        f"oob:{role}",
        n.block,
    )


def truncate(meta: bytes, nr_blocks: int | None = None) -> Damaged:
    """Cut the image.  Default: just before the highest used block."""
    if nr_blocks is None:
        nr_blocks = max(MetaMap(meta).used_blocks())
    return Damaged(
        bytearray(meta[: nr_blocks * BLOCK]),
        f"truncated to {nr_blocks} blocks",
        "truncate",
        nr_blocks,
    )


def all_damage(meta: bytes) -> list[Damaged]:
    """One of each damage that applies to *meta* (skips those whose target block type is absent).
    Best used on a pool with a multi-level bottom tree (e.g. poolgen.multilevel_pool)."""
    out: list[Damaged] = []

    def add(f, *a, **k):
        try:
            out.append(f(meta, *a, **k))
        except LookupError:
            pass

    for kind in ("superblock", "btree_internal", "btree_leaf", "index"):
        add(flip_byte, kind, fix_csum=False)
        add(flip_byte, kind, fix_csum=True)
        add(wrong_blocknr, kind)
    for role in ("data", "meta"):
        add(flip_byte, "bitmap", role=role, fix_csum=False)
        add(flip_byte, "bitmap", role=role, fix_csum=True)
        add(wrong_blocknr, "bitmap", role=role)
    add(flip_byte, "btree_leaf", role="details", fix_csum=True)
    add(wrong_blocknr, "btree_leaf", role="top")
    add(wrong_nr_allocated, "metadata")
    add(wrong_nr_allocated, "data")
    add(leaked_block, 1)
    add(leaked_block, 2)
    add(missing_reference)
    add(cycle)
    add(cycle, to="top")
    add(out_of_range_pointer)
    add(out_of_range_pointer, "top")
    add(truncate)
    return out
