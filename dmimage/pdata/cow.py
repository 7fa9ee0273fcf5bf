"""Copy-on-write btrees over a transaction: the kernel's shadowing rules, offline.

A :class:`Transaction` sees the last committed metadata through a read-only reader and keeps
every node it changes in memory until commit. Its rules are the kernel's (thin-format.md §6):

* a block may change in place only if this transaction allocated it; otherwise it is
  *shadowed*: copied to a new block, the original's count drops by one and, if the original was
  shared (count > 1), everything the copy references gains a reference;
* allocation never reuses a block that is in use in the committed state, so the committed trees
  stay intact on disk until the new superblock is written.

Trees are described by a :class:`TreeKind` that says how leaf values hold references (mapping
leaves hold data blocks, top-level leaves hold bottom-tree roots, others hold none). Nodes are
small (at most 252 entries), so a changed node is kept as two Python lists.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np

from dmimage.errors import DmimageError, MetadataError
from dmimage.format.checksum import seal
from dmimage.format.constants import (
    BLOCK_SIZE,
    BTREE_HEADER_SIZE,
    BTREE_INTERNAL,
    BTREE_LEAF,
    max_entries,
)
from dmimage.format.layouts import BTREE_HEADER_STRUCT
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import U64, read_node

#: A leaf value: a u64 (trees whose kind has ``int_values``) or the value's raw bytes.
Value: TypeAlias = int | bytes


#: Blocks examined per step when looking for a free block.
_ALLOC_WINDOW = 4096


class OutOfSpaceError(DmimageError):
    """No free block left in a space map (metadata or data)."""

    exit_code = 1


class SpaceAccount:
    """Reference counts of one space map during a transaction.

    ``committed_used`` marks blocks in use at the last commit: they are never handed out in this
    transaction even if their count drops to zero (the committed state must survive a crash).
    """

    def __init__(self, counts: np.ndarray, what: str):
        self.counts = counts.astype(np.uint32, copy=True)
        self.committed_used = counts != 0
        self.what = what
        self.cursor = 0

    @property
    def nr_blocks(self) -> int:
        return len(self.counts)

    def alloc(self) -> int:
        """The first free block from the cursor on, wrapping once; count becomes 1.

        Scans a window at a time from the cursor, so an allocation costs about the distance
        to the next free block, not the size of the device."""
        n = len(self.counts)
        start = self.cursor if self.cursor < n else 0
        scanned = 0
        while scanned < n:
            end = min(start + _ALLOC_WINDOW, n)
            free = (self.counts[start:end] == 0) & ~self.committed_used[start:end]
            hit = int(np.argmax(free))
            if free[hit]:
                b = start + hit
                self.counts[b] = 1
                self.cursor = b + 1
                return b
            scanned += end - start
            start = end if end < n else 0
        raise OutOfSpaceError(f"{self.what}: no free blocks left ({self.nr_blocks} blocks)")

    def alloc_many(self, k: int) -> np.ndarray:
        """``k`` blocks as :meth:`alloc` would hand them out one by one (int64, count 1 each),
        found a window at a time."""
        n = len(self.counts)
        out: list[np.ndarray] = []
        got = 0
        start = self.cursor if self.cursor < n else 0
        scanned = 0
        window = max(_ALLOC_WINDOW, 2 * k)
        while got < k and scanned < n:
            end = min(start + window, n)
            free = np.flatnonzero((self.counts[start:end] == 0)
                                  & ~self.committed_used[start:end])[: k - got] + start
            if len(free):
                out.append(free)
                got += len(free)
                self.cursor = int(free[-1]) + 1
            scanned += end - start
            start = end if end < n else 0
        if got < k:
            raise OutOfSpaceError(f"{self.what}: no free blocks left for {k} more "
                                  f"({self.nr_blocks} blocks)")
        blocks = np.concatenate(out).astype(np.int64)
        self.counts[blocks] = 1
        return blocks

    def inc(self, b: int, by: int = 1) -> None:
        self.counts[b] += by

    def inc_many(self, blocks: np.ndarray) -> None:
        if len(blocks):
            np.add.at(self.counts, blocks.astype(np.int64), 1)

    def dec(self, b: int) -> int:
        """Drop one reference; return the new count."""
        c = int(self.counts[b])
        if c == 0:
            raise MetadataError(f"{self.what}: reference count of block {b} would go below 0",
                                block=b)
        self.counts[b] = c - 1
        return c - 1

    def get(self, b: int) -> int:
        return int(self.counts[b])


@dataclass(slots=True)
class MNode:
    """A node being changed: lists of keys and values (ints, or bytes for wide values)."""

    blocknr: int
    is_leaf: bool
    value_size: int
    keys: list[int] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)

    @property
    def max_entries(self) -> int:
        return max_entries(self.value_size)

    def encode(self) -> bytearray:
        out = bytearray(BLOCK_SIZE)
        maxe = self.max_entries
        nr = len(self.keys)
        BTREE_HEADER_STRUCT.pack_into(out, 0, 0, BTREE_LEAF if self.is_leaf else BTREE_INTERNAL,
                                      self.blocknr, nr, maxe, self.value_size, 0)
        if nr:
            out[BTREE_HEADER_SIZE : BTREE_HEADER_SIZE + 8 * nr] = np.asarray(
                self.keys, dtype=U64).tobytes()
            voff = BTREE_HEADER_SIZE + 8 * maxe
            if self.value_size == 8 and not isinstance(self.values[0], bytes):
                raw = np.asarray(self.values, dtype=U64).tobytes()
            else:
                raw = b"".join(self.values)
            out[voff : voff + len(raw)] = raw
        seal(out, 121107)
        return out


@dataclass(slots=True, frozen=True)
class TreeKind:
    """How a tree's leaves hold references: ``inc``/``dec`` are called per leaf value."""

    name: str
    value_size: int
    #: True: values are u64 ints; False: raw bytes of value_size.
    int_values: bool
    inc: Callable[[Transaction, Value], None] | None = None
    dec: Callable[[Transaction, Value], None] | None = None


class Transaction:
    """Changes to metadata not yet committed: dirty nodes and both space accounts."""

    def __init__(self, reader: BlockReader, meta: SpaceAccount, data: SpaceAccount):
        self.reader = reader
        self.meta = meta
        self.data = data
        self.dirty: dict[int, MNode] = {}
        self.fresh: set[int] = set()

    # -- nodes ---------------------------------------------------------------------------
    def load(self, b: int, kind: TreeKind) -> MNode:
        """A node's current contents (the dirty copy if there is one). Do not modify."""
        node = self.dirty.get(b)
        if node is not None:
            return node
        n = read_node(self.reader, b, kind.value_size)
        if n.is_leaf:
            if kind.int_values:
                values: list[Any] = n.values(U64).tolist()
            else:
                raw = bytes(n.raw_values)
                vs = kind.value_size
                values = [raw[i * vs : (i + 1) * vs] for i in range(n.nr_entries)]
            return MNode(b, True, kind.value_size, n.keys.tolist(), values)
        return MNode(b, False, 8, n.keys.tolist(), n.values(U64).tolist())

    def new_node(self, is_leaf: bool, kind: TreeKind) -> MNode:
        b = self.meta.alloc()
        node = MNode(b, is_leaf, kind.value_size if is_leaf else 8)
        self.dirty[b] = node
        self.fresh.add(b)
        return node

    def shadow(self, b: int, kind: TreeKind) -> MNode:
        """A writable version of node ``b``: itself if this transaction allocated it and nothing
        else references it yet, else a copy at a new block (as dm_tm_shadow_block)."""
        if b in self.fresh and self.meta.get(b) == 1:
            return self.dirty[b]
        src = self.load(b, kind)
        node = self.new_node(src.is_leaf, kind)
        node.keys = list(src.keys)
        node.values = list(src.values)
        if self.meta.dec(b) > 0:
            self._inc_children(node, kind)
        return node

    def _inc_children(self, node: MNode, kind: TreeKind) -> None:
        if not node.is_leaf:
            for c in node.values:
                self.meta.inc(c)
        elif kind.inc is not None:
            for v in node.values:
                kind.inc(self, v)

    def dec_tree(self, b: int, kind: TreeKind) -> None:
        """Drop one reference to the subtree at ``b``; free what nobody else references."""
        if self.meta.dec(b) > 0:
            return
        node = self.load(b, kind)
        self.dirty.pop(b, None)
        self.fresh.discard(b)
        if not node.is_leaf:
            for c in node.values:
                self.dec_tree(c, kind)
        elif kind.dec is not None:
            for v in node.values:
                kind.dec(self, v)

    def free_node(self, node: MNode) -> None:
        """Forget a fresh node whose entries moved elsewhere (no child references change)."""
        self.meta.dec(node.blocknr)
        self.dirty.pop(node.blocknr, None)
        self.fresh.discard(node.blocknr)

    # -- btree operations ----------------------------------------------------------------
    def new_tree(self, kind: TreeKind) -> int:
        return self.new_node(True, kind).blocknr

    def lookup(self, root: int, key: int, kind: TreeKind) -> Value | None:
        b = root
        while True:
            node = self.load(b, kind)
            i = bisect.bisect_right(node.keys, key) - 1
            if node.is_leaf:
                return node.values[i] if i >= 0 and node.keys[i] == key else None
            if i < 0:
                return None
            b = node.values[i]

    def insert(self, root: int, key: int, value: Value, kind: TreeKind
               ) -> tuple[int, Value | None]:
        """Insert or overwrite; return (new root, previous value or None).

        Leaf value references are the caller's business (it knows whether the value changed).
        """
        node = self.shadow(root, kind)
        old, split = self._insert(node, key, value, kind)
        if split is None:
            return node.blocknr, old
        new_root = self.new_node(False, kind)
        new_root.keys = [node.keys[0], split.keys[0]]
        new_root.values = [node.blocknr, split.blocknr]
        return new_root.blocknr, old

    def _insert(self, node: MNode, key: int, value: Value, kind: TreeKind
                ) -> tuple[Value | None, MNode | None]:
        keys = node.keys
        if node.is_leaf:
            i = bisect.bisect_left(keys, key)
            if i < len(keys) and keys[i] == key:
                old = node.values[i]
                node.values[i] = value
                return old, None
            keys.insert(i, key)
            node.values.insert(i, value)
            old = None
        else:
            i = bisect.bisect_right(keys, key) - 1
            if i < 0:
                i = 0
                keys[0] = key  # the kernel lowers the first key for a new minimum
            child = self.shadow(node.values[i], kind)
            node.values[i] = child.blocknr
            old, split = self._insert(child, key, value, kind)
            if split is not None:
                keys.insert(i + 1, split.keys[0])
                node.values.insert(i + 1, split.blocknr)
        if len(keys) <= node.max_entries:
            return old, None
        right = self.new_node(node.is_leaf, kind)
        half = len(keys) // 2
        right.keys, node.keys = keys[half:], keys[:half]
        right.values, node.values = node.values[half:], node.values[:half]
        return old, right

    def remove(self, root: int, key: int, kind: TreeKind) -> tuple[int, Value | None]:
        """Remove ``key`` if present; return (new root, removed value or None)."""
        if self.lookup(root, key, kind) is None:
            return root, None
        node = self.shadow(root, kind)
        old = self._remove(node, key, kind)
        b = node.blocknr
        while True:  # an internal root left with one child hands the tree to that child
            n = self.load(b, kind)
            if n.is_leaf or len(n.keys) != 1:
                return b, old
            child = n.values[0]
            if self.meta.dec(b) > 0:
                self.meta.inc(child)
            else:
                self.dirty.pop(b, None)
                self.fresh.discard(b)
            b = child

    def _remove(self, node: MNode, key: int, kind: TreeKind) -> Value:
        keys = node.keys
        i = bisect.bisect_right(keys, key) - 1
        if node.is_leaf:
            del keys[i]
            removed: Value = node.values.pop(i)
            return removed
        child = self.shadow(node.values[i], kind)
        node.values[i] = child.blocknr
        old = self._remove(child, key, kind)
        if len(child.keys) < child.max_entries // 3 and len(keys) > 1:
            self._rebalance(node, i, kind)
        return old

    def _rebalance(self, parent: MNode, i: int, kind: TreeKind) -> None:
        """Merge the underfull child i with a neighbour, or share entries evenly with it."""
        j = i + 1 if i + 1 < len(parent.keys) else i - 1
        li, ri = min(i, j), max(i, j)
        left = self.shadow(parent.values[li], kind)
        parent.values[li] = left.blocknr
        right = self.shadow(parent.values[ri], kind)
        parent.values[ri] = right.blocknr
        total = len(left.keys) + len(right.keys)
        if total <= left.max_entries:
            left.keys += right.keys
            left.values += right.values
            right.keys, right.values = [], []
            self.free_node(right)
            del parent.keys[ri]
            del parent.values[ri]
            return
        keys = left.keys + right.keys
        values = left.values + right.values
        half = total // 2
        left.keys, right.keys = keys[:half], keys[half:]
        left.values, right.values = values[:half], values[half:]
        parent.keys[ri] = right.keys[0]

    def range_items(self, root: int, lo: int, hi: int, kind: TreeKind
                    ) -> tuple[list[int], list[Value]]:
        """Keys in [lo, hi) and their values (current state), visiting only the nodes whose
        key range overlaps it."""
        keys: list[int] = []
        values: list[Value] = []
        self._range(root, lo, hi, kind, keys, values)
        return keys, values

    def _range(self, b: int, lo: int, hi: int, kind: TreeKind, keys: list[int],
               values: list[Value]) -> None:
        node = self.load(b, kind)
        nk = node.keys
        if node.is_leaf:
            i, j = bisect.bisect_left(nk, lo), bisect.bisect_left(nk, hi)
            keys.extend(nk[i:j])
            values.extend(node.values[i:j])
            return
        i = max(bisect.bisect_right(nk, lo) - 1, 0)
        j = bisect.bisect_left(nk, hi)
        for c in node.values[i:j]:
            self._range(c, lo, hi, kind, keys, values)

    def insert_many(self, root: int, keys: list[int], values: list[Value], kind: TreeKind
                    ) -> tuple[int, list[Value]]:
        """Insert or overwrite ascending ``keys`` at once; return (new root, the overwritten
        values). Each touched node is shadowed once and a node that overflows is cut into
        even parts (each at least half full), so a run of thousands of keys costs per node,
        not per key. Leaf value references are the caller's business, as for :meth:`insert`."""
        if not keys:
            return root, []
        replaced: list[Value] = []
        nodes = self._insert_many(self.shadow(root, kind), keys, values, kind, replaced)
        while len(nodes) > 1:
            parent = self.new_node(False, kind)
            parent.keys = [n.keys[0] for n in nodes]
            parent.values = [n.blocknr for n in nodes]
            nodes = self._split_even(parent, kind)
        return nodes[0].blocknr, replaced

    def _insert_many(self, node: MNode, keys: list[int], values: list[Value], kind: TreeKind,
                     replaced: list[Value]) -> list[MNode]:
        """Merge sorted entries into the (shadowed) ``node``; the node(s) it became."""
        if node.is_leaf:
            old = dict(zip(node.keys, node.values, strict=True))
            for k, v in zip(keys, values, strict=True):
                prev = old.get(k)
                if prev is not None:
                    replaced.append(prev)
                old[k] = v
            merged = sorted(old)
            node.keys = merged
            node.values = [old[k] for k in merged]
            return self._split_even(node, kind)
        nk = node.keys
        if keys[0] < nk[0]:
            nk[0] = keys[0]  # the kernel lowers the first key for a new minimum
        # child i takes the keys in [nk[i], nk[i+1])
        cuts = [bisect.bisect_left(keys, k) for k in nk[1:]]
        bounds = [0, *cuts, len(keys)]
        new_keys: list[int] = []
        new_values: list[Any] = []
        for i, c in enumerate(node.values):
            a, z = bounds[i], bounds[i + 1]
            if a == z:
                new_keys.append(nk[i])
                new_values.append(c)
                continue
            child = self.shadow(c, kind)
            for part in self._insert_many(child, keys[a:z], values[a:z], kind, replaced):
                new_keys.append(part.keys[0])
                new_values.append(part.blocknr)
        node.keys, node.values = new_keys, new_values
        return self._split_even(node, kind)

    def _split_even(self, node: MNode, kind: TreeKind) -> list[MNode]:
        """``node`` cut into the fewest nodes that fit, entries spread evenly."""
        n = len(node.keys)
        if n <= node.max_entries:
            return [node]
        parts = -(-n // node.max_entries)
        keys, values = node.keys, node.values
        bounds = [n * i // parts for i in range(parts + 1)]
        node.keys, node.values = keys[: bounds[1]], values[: bounds[1]]
        out = [node]
        for a, z in zip(bounds[1:-1], bounds[2:], strict=True):
            part = self.new_node(node.is_leaf, kind)
            part.keys, part.values = keys[a:z], values[a:z]
            out.append(part)
        return out

    def items(self, root: int, kind: TreeKind) -> list[tuple[int, Value]]:
        """Every (key, value) in key order (current state)."""
        node = self.load(root, kind)
        if node.is_leaf:
            return list(zip(node.keys, node.values, strict=True))
        out: list[tuple[int, Value]] = []
        for c in node.values:
            out.extend(self.items(c, kind))
        return out

    def encoded_dirty(self) -> list[tuple[int, bytearray]]:
        return [(b, n.encode()) for b, n in sorted(self.dirty.items())]
