"""Reading persistent-data btrees: validated nodes and ordered, checked walks.

A node is one 4 KiB block: a 32-byte header, ``max_entries`` u64 keys, then ``max_entries``
values (values start after *max* keys, not after the used ones). Leaves hold the tree's values;
internal nodes hold u64 child block numbers whatever the leaf value size.

:class:`BtreeWalker` checks everything thin_check 1.x checks about a tree's shape (node headers,
key order, child key ranges, equal leaf depth, fill of non-root nodes, cycles) and can count
references to metadata blocks on the way. It validates each block once and remembers a summary
of every subtree, so shared subtrees cost one visit however many parents point at them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from dmimage.errors import BlockNumberError, ChecksumError, FormatError, MetadataError
from dmimage.format.checksum import (
    BLOCK_TYPE_NAMES,
    block_checksum,
    sniff_block_type,
    stored_checksum,
)
from dmimage.format.constants import (
    BLOCK_SIZE,
    BTREE_HEADER_SIZE,
    BTREE_INTERNAL,
    BTREE_LEAF,
    INTERNAL_VALUE_SIZE,
    KEY_END,
    KEY_SIZE,
    LEAF_VALUE_SIZES,
    SALT_BTREE_NODE,
)
from dmimage.format.layouts import BTREE_HEADER_STRUCT
from dmimage.pdata.block import BlockReader

U64 = np.dtype("<u8")
#: No real tree is deeper: 84-way fan-out exhausts 64-bit keys in 10 levels.
MAX_DEPTH = 12


@dataclass(slots=True)
class Node:
    """One validated btree node; ``keys`` and ``values`` are views of the block."""

    blocknr: int
    is_leaf: bool
    nr_entries: int
    max_entries: int
    value_size: int
    keys: np.ndarray
    raw_values: memoryview
    #: a node standing for these sibling leaves, validated together (BtreeWalker's
    #: ``batch_leaves``); their values are left out of ``raw_values`` in a ``by_block`` walk
    leaves: np.ndarray | None = None

    def values(self, dtype: np.dtype | str = U64) -> np.ndarray:
        return np.frombuffer(self.raw_values, dtype=dtype, count=self.nr_entries)


def read_node(reader: BlockReader, blocknr: int, leaf_value_size: int) -> Node:
    """Read and validate one node the way the kernel's validator and thin_check do.

    Raises a MetadataError subclass naming the block and field on the first problem.
    """
    block = reader.block(blocknr)
    if block_checksum(block, SALT_BTREE_NODE) != stored_checksum(block):
        kind = sniff_block_type(block)
        other = kind and kind != BLOCK_TYPE_NAMES[SALT_BTREE_NODE]
        hint = f" (it is a {kind} block)" if other else ""
        raise ChecksumError(f"btree node checksum mismatch{hint}", block=blocknr, field="csum")
    return parse_node(block, blocknr, leaf_value_size)


def parse_node(block: memoryview, blocknr: int, leaf_value_size: int | None, *,
                check_blocknr: bool = True) -> Node:
    """The header rules of the kernel's validator and thin_check, checksum aside; then
    :func:`node_view`. Raises a MetadataError subclass naming the field on the first problem.

    ``leaf_value_size=None`` accepts a leaf of any value size a thin pool uses (a scan that
    does not know the tree yet); ``check_blocknr=False`` accepts a wrong blocknr field.
    """
    _csum, flags, own, nr, max_entries, value_size, _pad = BTREE_HEADER_STRUCT.unpack_from(block)
    if check_blocknr and own != blocknr:
        raise BlockNumberError(f"btree node says it is block {own}", block=blocknr, field="blocknr")
    if flags == BTREE_LEAF:
        is_leaf = True
    elif flags == BTREE_INTERNAL:
        is_leaf = False
    else:
        raise FormatError(f"btree node flags {flags} (expected 1 or 2)", block=blocknr,
                          field="flags")
    # An internal node's value_size field is not used: the kernel and thin_check 1.1 read its
    # values as u64 block numbers whatever it says (only the size bound below applies).
    if is_leaf and leaf_value_size is None and value_size not in LEAF_VALUE_SIZES:
        raise FormatError(f"leaf value_size {value_size} is none a thin pool uses",
                          block=blocknr, field="value_size")
    if is_leaf and leaf_value_size is not None and value_size != leaf_value_size:
        raise FormatError(f"leaf value_size {value_size}, expected {leaf_value_size}",
                          block=blocknr, field="value_size")
    if BTREE_HEADER_SIZE + (KEY_SIZE + value_size) * max_entries > BLOCK_SIZE:
        raise FormatError(f"max_entries {max_entries} does not fit a block", block=blocknr,
                          field="max_entries")
    if max_entries % 3:
        raise FormatError(f"max_entries {max_entries} is not a multiple of 3", block=blocknr,
                          field="max_entries")
    if nr > max_entries:
        raise FormatError(f"nr_entries {nr} > max_entries {max_entries}", block=blocknr,
                          field="nr_entries")
    if not is_leaf and BTREE_HEADER_SIZE + KEY_SIZE * max_entries + INTERNAL_VALUE_SIZE * nr \
            > BLOCK_SIZE:
        # a value_size field below 8 lets max_entries pass the bound above, but the child
        # pointers are read as u64 whatever it says
        raise FormatError(f"internal node: {nr} child pointers after {max_entries} keys run "
                          "past the end of the block", block=blocknr, field="max_entries")
    return node_view(block, blocknr, is_leaf, nr, max_entries,
                     value_size if is_leaf else INTERNAL_VALUE_SIZE)


def node_view(block: memoryview, blocknr: int, is_leaf: bool, nr_entries: int,
              max_entries: int, value_size: int) -> Node:
    """A node's keys and values as views of its block: values start after *max* keys.

    The caller has checked that ``nr_entries <= max_entries`` and that they fit the block."""
    keys = np.frombuffer(block, dtype=U64, count=nr_entries, offset=BTREE_HEADER_SIZE)
    vstart = BTREE_HEADER_SIZE + KEY_SIZE * max_entries
    return Node(blocknr, is_leaf, nr_entries, max_entries, value_size, keys,
                block[vstart : vstart + value_size * nr_entries])


def fill_problem(node: Node, is_root: bool, what: str) -> MetadataError | None:
    """thin_check's fill rule: a non-root node holds at least max_entries // 3 entries."""
    minimum = node.max_entries // 3
    if is_root or node.nr_entries >= minimum:
        return None
    return MetadataError(f"{what}: underfull node: {node.nr_entries} entries, minimum {minimum}",
                         block=node.blocknr, field="nr_entries")


def order_problem(node: Node, lo: int, hi: int, what: str) -> MetadataError | None:
    """Keys strictly ascending and inside the parent's range [lo, hi); an internal node
    must not be empty (:func:`sort_problem`, then :func:`range_problem`)."""
    return sort_problem(node, what) or range_problem(node, lo, hi, what)


def sort_problem(node: Node, what: str) -> MetadataError | None:
    """Keys not strictly ascending, or an empty internal node: the node cannot be searched,
    so its whole subtree is unusable."""
    keys = node.keys
    nr = node.nr_entries
    if nr == 0:
        if node.is_leaf:
            return None
        return MetadataError(f"{what}: internal node with no entries", block=node.blocknr,
                             field="nr_entries")
    if nr > 1 and not bool((keys[1:] > keys[:-1]).all()):
        return MetadataError(f"{what}: keys not in ascending order", block=node.blocknr,
                             field="keys")
    return None


def range_problem(node: Node, lo: int, hi: int, what: str) -> MetadataError | None:
    """Keys (ascending) outside the parent's range [lo, hi). The kernel routes a lookup by
    the parent's keys, so such a key is never found; the node's other keys still are."""
    if node.nr_entries == 0:
        return None
    first, last = int(node.keys[0]), int(node.keys[-1])
    if first < lo or last >= hi:
        return MetadataError(f"{what}: keys {first}..{last} outside the parent's range "
                             f"{lo}..{hi - 1}", block=node.blocknr, field="keys")
    return None


def in_range(keys: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Mask of the (ascending) keys a lookup routed into [lo, hi) can reach."""
    mask = keys >= np.uint64(lo)
    if hi < KEY_END:
        mask &= keys < np.uint64(hi)
    return mask


def leaf_subset(node: Node, mask: np.ndarray) -> Node:
    """A leaf holding only the entries under ``mask`` (copies)."""
    vals = np.frombuffer(node.raw_values, dtype=f"V{node.value_size}", count=node.nr_entries)
    n = int(np.count_nonzero(mask))
    return Node(node.blocknr, True, n, node.max_entries, node.value_size,
                np.ascontiguousarray(node.keys[mask]), memoryview(vals[mask].tobytes()))


class SubtreeSummary(NamedTuple):
    """What a parent needs to know about a child subtree already walked (a tuple: a batch
    of sibling leaves records tens of thousands of them at C speed)."""

    height: int  # 0 for a leaf
    first_key: int  # KEY_END for an empty leaf
    last_key: int
    entries: int  # leaf entries below (mappings, for a bottom-level tree)


ErrorSink = Callable[[MetadataError], None]
LeafVisitor = Callable[[Node], None]


def _raise(err: MetadataError) -> None:
    raise err


class BtreeWalker:
    """Walks trees over one metadata device, validating and (optionally) counting references.

    ``meta_counts``: if given, ``meta_counts[b] += 1`` for every reference to node ``b`` (each
    root passed to :meth:`walk` and each internal-node child pointer), as the metadata space map
    must count them. ``on_error``: where problems go; the default raises the first one.
    """

    def __init__(
        self,
        reader: BlockReader,
        *,
        meta_counts: np.ndarray | None = None,
        on_error: ErrorSink = _raise,
        batch_leaves: bool = False,
    ):
        """``batch_leaves``: sibling leaves of 8-byte values, none seen before and all
        sound, are validated together (pdata/leaves.py) and handed to ``visit_leaf`` as one
        node holding all their entries (block number: the first leaf's); the results are
        the same, only faster. Anything doubtful takes the one-node path."""
        self.reader = reader
        self.meta_counts = meta_counts
        self.on_error = on_error
        self.batch_leaves = batch_leaves
        self._summaries: dict[int, SubtreeSummary | None] = {}
        #: leaves recorded a group at a time (_leaf_group) instead of in _summaries: for
        #: block b, ``(group + 1) << 8 | b's place among its siblings`` (0: not grouped;
        #: a group is at most 255 siblings);
        #: their summaries are made only if a later walk meets them again (a Python tuple
        #: and two dict entries a leaf were ~20 ms of a 10M-mapping check, and garbage the
        #: exit's collection traversed again)
        self._grouped: np.ndarray | None = None
        #: each group's first keys, last keys and entry counts (one of each a leaf)
        self._groups: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._in_progress: set[int] = set()
        self._value_size: dict[int, int] = {}
        #: nodes first walked as a root that would be underfull as a child
        self._underfull_as_child: dict[int, Node] = {}
        #: leaves with keys outside a parent's range: which entries some walk has reached
        self._reached: dict[int, np.ndarray] = {}
        self._by_block = False

    def walk(
        self,
        root: int,
        leaf_value_size: int,
        visit_leaf: LeafVisitor | None = None,
        *,
        what: str = "btree",
        by_block: bool = False,
    ) -> SubtreeSummary | None:
        """Walk the tree at ``root`` once; ``visit_leaf`` sees each leaf not walked before.

        ``by_block``: a group of sibling leaves validated together (``batch_leaves``) reaches
        ``visit_leaf`` without its values (empty ``raw_values``; ``leaves`` names the blocks
        to read them from). Returns the root's summary, or None when the root itself is
        unusable (reported).
        """
        self._by_block = by_block
        try:
            return self._visit(root, leaf_value_size, visit_leaf, 0, KEY_END, True, 0, what)
        finally:
            self._by_block = False

    def _grouped_summary(self, blocknr: int) -> SubtreeSummary | None:
        """The summary of a leaf recorded by :meth:`_leaf_group`, else None."""
        grouped = self._grouped
        if grouped is None or not 0 <= blocknr < len(grouped):
            return None
        code = int(grouped[blocknr])
        if not code:
            return None
        firsts, lasts, counts = self._groups[(code >> 8) - 1]
        i = code & 0xFF
        return SubtreeSummary(0, int(firsts[i]), int(lasts[i]), int(counts[i]))

    def _count(self, blocknr: int) -> None:
        counts = self.meta_counts
        if counts is not None and 0 <= blocknr < len(counts):
            counts[blocknr] += 1

    def _visit(
        self,
        blocknr: int,
        vs: int,
        visit_leaf: LeafVisitor | None,
        lo: int,
        hi: int,
        is_root: bool,
        depth: int,
        what: str,
    ) -> SubtreeSummary | None:
        self._count(blocknr)
        if blocknr in self._in_progress:
            self.on_error(MetadataError(f"{what}: cycle: node is its own ancestor", block=blocknr))
            return None
        grouped = self._grouped_summary(blocknr)
        if grouped is not None or blocknr in self._summaries:
            summary = grouped if grouped is not None else self._summaries[blocknr]
            if not is_root and blocknr in self._underfull_as_child:
                # first walked as a root (exempt from the fill rule), now a child too
                problem = fill_problem(self._underfull_as_child.pop(blocknr), False, what)
                if problem is not None:
                    self.on_error(problem)
            known_vs = 8 if grouped is not None else self._value_size.get(blocknr)
            if summary is not None and known_vs != vs:
                self.on_error(FormatError(f"{what}: node shared between trees of different "
                                          "value sizes", block=blocknr))
                return None
            outside = summary is not None and summary.entries > 0 and not (
                lo <= summary.first_key and summary.last_key < hi)
            if outside:
                assert summary is not None
                self.on_error(MetadataError(
                    f"{what}: shared subtree keys {summary.first_key}..{summary.last_key} "
                    f"outside parent range {lo}..{hi - 1}", block=blocknr, field="keys"))
            if summary is not None and summary.height == 0 and (
                    outside or blocknr in self._reached):
                return self._reach(blocknr, vs, visit_leaf, lo, hi, what)
            return summary
        if depth > MAX_DEPTH:
            self.on_error(MetadataError(f"{what}: tree deeper than {MAX_DEPTH} levels",
                                        block=blocknr))
            return None
        try:
            node = read_node(self.reader, blocknr, vs)
        except MetadataError as err:
            if err.block is None:
                err.block = blocknr
            self._summaries[blocknr] = None
            self.on_error(_prefixed(err, what))
            return None
        self._value_size[blocknr] = vs
        summary = self._check_node(node, vs, visit_leaf, lo, hi, is_root, depth, what)
        self._summaries[blocknr] = summary
        if blocknr in self._reached:
            return self._reach(blocknr, vs, visit_leaf, lo, hi, what, node)
        return summary

    def _reach(self, blocknr: int, vs: int, visit_leaf: LeafVisitor | None, lo: int, hi: int,
               what: str, node: Node | None = None) -> SubtreeSummary | None:
        """A leaf with keys outside its parent's range [lo, hi) (reported): as the kernel
        reads it, this path reaches only its keys inside the range. Entries no walk reached
        before are visited now; the summary counts what this path reaches."""
        if node is None:
            try:
                node = read_node(self.reader, blocknr, vs)
            except MetadataError as err:  # it was read and validated before
                self.on_error(_prefixed(err, what))
                return None
        mask = in_range(node.keys, lo, hi)
        # a leaf not in _reached was visited whole by a walk whose range held it
        reached = self._reached.setdefault(blocknr, np.ones(node.nr_entries, dtype=bool))
        new = mask & ~reached
        reached |= mask
        if visit_leaf is not None and new.any():
            visit_leaf(leaf_subset(node, new))
        n = int(np.count_nonzero(mask))
        if n == 0:
            return SubtreeSummary(0, KEY_END, 0, 0)
        keys = node.keys[mask]
        return SubtreeSummary(0, int(keys[0]), int(keys[-1]), n)

    def _check_node(
        self,
        node: Node,
        vs: int,
        visit_leaf: LeafVisitor | None,
        lo: int,
        hi: int,
        is_root: bool,
        depth: int,
        what: str,
    ) -> SubtreeSummary | None:
        b = node.blocknr
        nr = node.nr_entries
        underfull = fill_problem(node, is_root, what)
        if underfull is not None:
            self.on_error(underfull)
        elif is_root and nr < node.max_entries // 3:  # fill_problem's rule, as a child
            self._underfull_as_child[b] = node
        bad = sort_problem(node, what)
        if bad is not None:
            self.on_error(bad)
            return None
        if nr == 0:
            return SubtreeSummary(0, KEY_END, 0, 0)
        keys = node.keys
        first, last = int(keys[0]), int(keys[-1])
        outside = range_problem(node, lo, hi, what)
        if outside is not None:
            self.on_error(outside)
            if not node.is_leaf:
                return None  # an internal node's subtree is dropped whole
            # the kernel still finds the leaf's keys inside the range: _visit reaches those
            self._reached[b] = np.zeros(nr, dtype=bool)
            return SubtreeSummary(0, first, last, nr)
        if node.is_leaf:
            if visit_leaf is not None:
                visit_leaf(node)
            return SubtreeSummary(0, first, last, nr)
        if self.batch_leaves and vs == 8 and depth + 1 <= MAX_DEPTH:
            fast = self._leaf_group(node, visit_leaf, hi)
            if fast is not None:
                return fast
        self._in_progress.add(b)
        try:
            children = node.values(U64).tolist()
            key_list = keys.tolist()
            height: int | None = None
            entries = 0
            real_first = KEY_END
            real_last = 0
            for i, child in enumerate(children):
                child_hi = key_list[i + 1] if i + 1 < nr else hi
                s = self._visit(child, vs, visit_leaf, key_list[i], child_hi, False, depth + 1,
                                what)
                if s is None:
                    continue
                if height is None:
                    height = s.height
                elif s.height != height:
                    self.on_error(MetadataError(
                        f"{what}: leaves at different depths under this node", block=b))
                    return None
                entries += s.entries
                if s.entries:
                    real_first = min(real_first, s.first_key)
                    real_last = max(real_last, s.last_key)
            if height is None:
                return None
            return SubtreeSummary(height + 1, real_first, real_last, entries)
        finally:
            self._in_progress.discard(b)


    def _leaf_group(self, node: Node, visit_leaf: LeafVisitor | None, hi: int
                    ) -> SubtreeSummary | None:
        """The children of ``node`` as fresh, sound leaves, all at once; None (nothing
        recorded) when they are not."""
        from dmimage.pdata.leaves import validated_leaves

        reader = self.reader
        kids = node.values(U64).astype(np.int64)
        first = int(kids[0])
        if not 0 <= first < reader.nr_blocks or reader.block(first)[4] != BTREE_LEAF:
            return None
        if int(kids.min()) < 0 or int(kids.max()) >= reader.nr_blocks or len(kids) > 0xFF:
            return None  # as validated_leaves would answer (no node has 256 children)
        kid_list = kids.tolist()
        grouped = self._grouped
        if len(set(kid_list)) != len(kid_list) or not (
                self._summaries.keys().isdisjoint(kid_list)
                and self._in_progress.isdisjoint(kid_list)) or (
                grouped is not None and bool(grouped[kids].any())):
            return None
        entries = not self._by_block
        batch = validated_leaves(reader, kids, node.keys.copy(), hi, root=False, value_size=8,
                                 values=entries, keys=entries)
        if batch is None or not bool((batch.counts > 0).all()):
            return None
        counts = self.meta_counts
        if counts is not None:  # kids are distinct: a plain fancy increment counts each once
            counts[kids[(kids >= 0) & (kids < len(counts))]] += np.uint32(1)
        assert batch.first is not None and batch.last is not None
        total = int(batch.counts.sum())
        if grouped is None:
            # codes below (nr_blocks + 1) << 8: groups are fewer than blocks
            wide = (reader.nr_blocks + 1) << 8 >= 1 << 31
            grouped = self._grouped = np.zeros(reader.nr_blocks, np.int64 if wide else np.int32)
        self._groups.append((batch.first, batch.last, batch.counts))
        grouped[kids] = (len(self._groups) << 8) | np.arange(len(kids))
        if visit_leaf is not None:
            visit_leaf(Node(first, True, total, total, 8, batch.keys, batch.values.data, kids))
        return SubtreeSummary(1, int(batch.first[0]), int(batch.last[-1]), total)


def _prefixed(err: MetadataError, what: str) -> MetadataError:
    err.detail = f"{what}: {err.detail}"
    return err


def leaves_in_order(reader: BlockReader, root: int, leaf_value_size: int,
                    what: str = "btree") -> list[Node]:
    """Every leaf of one tree in key order, validated strictly (first problem raises).

    Unlike :class:`BtreeWalker` this revisits shared subtrees: the caller wants this tree's
    complete contents, not a census of blocks.
    """
    out: list[Node] = []

    def visit(blocknr: int, lo: int, hi: int, depth: int, is_root: bool) -> int:
        if depth > MAX_DEPTH:
            raise MetadataError(f"{what}: tree deeper than {MAX_DEPTH} levels (a cycle?)",
                                block=blocknr)
        try:
            node = read_node(reader, blocknr, leaf_value_size)
        except MetadataError as err:
            raise _prefixed(err, what) from None
        problem = fill_problem(node, is_root, what) or order_problem(node, lo, hi, what)
        if problem is not None:
            raise problem
        nr = node.nr_entries
        keys = node.keys
        if node.is_leaf:
            out.append(node)
            return 0
        key_list = keys.tolist()
        height = -1
        for i, child in enumerate(node.values(U64).tolist()):
            child_hi = key_list[i + 1] if i + 1 < nr else hi
            h = visit(child, key_list[i], child_hi, depth + 1, False)
            if height == -1:
                height = h
            elif h != height:
                raise MetadataError(f"{what}: leaves at different depths", block=blocknr)
        return height + 1

    visit(root, 0, KEY_END, 0, True)
    return out


def tree_items(reader: BlockReader, root: int, leaf_value_size: int, dtype: np.dtype | str,
               what: str = "btree") -> tuple[np.ndarray, np.ndarray]:
    """All (keys, values) of one tree as two arrays in key order."""
    leaves = leaves_in_order(reader, root, leaf_value_size, what)
    if not leaves:
        return np.empty(0, U64), np.empty(0, dtype)
    keys = np.concatenate([leaf.keys for leaf in leaves])
    values = np.concatenate([leaf.values(dtype) for leaf in leaves])
    return keys, values
