"""Per-device usage of a pool, as thin_ls 1.1 reports it.

How thin_ls 1.1.0 counts (read from its source; reproduced here with our own code):

* Every distinct node of every bottom-level mapping tree is read once. A node's *reference
  count* is the number of device roots naming it plus the number of distinct internal nodes
  pointing at it (an internal node reached twice contributes its children once).
* A data block's count is the number of times it appears across the *distinct* leaves (a leaf
  shared by several trees counts once).
* A leaf referenced more than once: all its mappings are shared. A leaf referenced once: a
  mapping is shared when its data block's count is > 1.
* An internal node sums its children; if it is itself referenced more than once, all its
  mappings are shared. Exclusive = mapped - shared.
* HIGHEST_BLOCK is the last key of the tree (0 when the device has no mappings, so an empty
  device reports HIGHEST_SECTOR = data_block_size - 1).
* Fields that need no counting (DEV, TRANSACTION, CREATE_TIME, SNAP_TIME) do not read the
  mapping trees at all.
* Table: every cell right-aligned to its column's widest cell, each followed by one space.
* Human units (MAPPED, ...): the unit is chosen so the number falls in [1024, 1048575] where
  possible; if it is then above 8192 the next unit is used, rounded half up. Suffixes "b",
  "KiB", "MiB", "GiB", "Tib" (sic), "PiB", "EiB".

Not reproduced: 1.1 refuses non-root nodes with fewer than 84 entries ("metadata contains
errors"); we count them like any other node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dmimage.errors import MetadataError, UsageError
from dmimage.format.constants import BTREE_LEAF, MAPPING_VALUE_SIZE
from dmimage.format.values import mapping_blocks
from dmimage.pdata import leaves
from dmimage.pdata.btree import MAX_DEPTH, U64, Node, order_problem, read_node
from dmimage.pdata.leaves import LeafBatch, gather_leaves, validated_leaves
from dmimage.thin.datarefs import CensusFailed, census
from dmimage.thin.pool import DeviceDetails, Pool

if TYPE_CHECKING:
    from dmimage.progress import Progress

__all__ = ["FIELDS", "DEFAULT_FIELDS", "DeviceUsage", "device_usage", "pretty_size",
           "ls_table", "render_grid", "ls_json", "parse_fields", "MappingForest", "DataCounts"]

FIELDS = (
    "DEV",
    "MAPPED_BLOCKS", "EXCLUSIVE_BLOCKS", "SHARED_BLOCKS", "HIGHEST_BLOCK",
    "MAPPED_SECTORS", "EXCLUSIVE_SECTORS", "SHARED_SECTORS", "HIGHEST_SECTOR",
    "MAPPED_BYTES", "EXCLUSIVE_BYTES", "SHARED_BYTES", "HIGHEST_BYTE",
    "MAPPED", "EXCLUSIVE", "SHARED", "HIGHEST_MAPPED",
    "TRANSACTION", "CREATE_TIME", "SNAP_TIME",
)
DEFAULT_FIELDS = ("DEV", "MAPPED", "CREATE_TIME", "SNAP_TIME")
_NON_COUNTING = {"DEV", "TRANSACTION", "CREATE_TIME", "SNAP_TIME"}
_HUMAN = {"MAPPED", "EXCLUSIVE", "SHARED", "HIGHEST_MAPPED"}
_U64_MASK = (1 << 64) - 1
_UNITS = ("b", "KiB", "MiB", "GiB", "Tib", "PiB", "EiB")


@dataclass(slots=True, frozen=True)
class DeviceUsage:
    """One device's details and thin_ls's counts (blocks)."""

    details: DeviceDetails
    mapped_blocks: int
    shared_blocks: int
    highest_block: int  # 0 when nothing is mapped, as thin_ls prints it

    @property
    def dev_id(self) -> int:
        return self.details.dev_id

    @property
    def exclusive_blocks(self) -> int:
        return self.mapped_blocks - self.shared_blocks


def parse_fields(text: str) -> list[str]:
    """A comma-separated field list (``-o``); unknown names raise UsageError."""
    out = []
    for name in text.split(","):
        if name not in FIELDS:
            raise UsageError(f"unknown field {name!r} (known: {', '.join(FIELDS)})")
        out.append(name)
    return out


def pretty_size(nbytes: int) -> str:
    """thin_ls 1.1's human-readable size, e.g. ``63MiB``, ``1024KiB``, ``0b``."""
    nbytes &= _U64_MASK
    i = max(0, (nbytes.bit_length() - 1) // 10 - 1) if nbytes else 0
    multiple = nbytes >> (10 * i)
    if multiple > 8192:
        multiple = (multiple + 512) >> 10  # f64 division then round-half-away (exact here)
        i += 1
    return f"{multiple}{_UNITS[i]}"


#: Called with each batch of leaves first read, in visit order, and the device reading them.
LeafVisitor = Callable[[LeafBatch, int], None]


class MappingForest:
    """Distinct nodes of all bottom-level trees, with thin_ls's reference counts.

    Roots are added in dev_id order; a node already read is not read again, so the leaves
    reach ``visit`` in the order thin_rmap 1.1 visits them, each attributed to the first
    device whose tree reaches it. Leaves are not kept: per leaf only its entry count and
    key span (a few dict entries), so memory is the tree shapes, not the mappings. The
    children of a bottom internal node are read and validated together (pdata/leaves.py)
    when none was read before; anything else goes one node at a time.
    """

    def __init__(self, pool: Pool, visit: LeafVisitor | None = None, *, entries: bool = True):
        """``entries=False``: a batch of sibling leaves validated together reaches ``visit``
        without its keys and values (a visitor that reads them by block number)."""
        self.reader = pool.reader
        self.visit = visit
        self.entries = entries
        self.refs: dict[int, int] = {}
        self.children: dict[int, list[int]] = {}  # internal nodes
        #: entries of each leaf, in the order leaves were first read
        self.leaf_entries: dict[int, int] = {}
        self.height: dict[int, int] = {}
        #: (first key, last key) below each node read (None: no entries)
        self.span: dict[int, tuple[int, int] | None] = {}
        self._stack: set[int] = set()

    def add_root(self, root: int, dev_id: int) -> None:
        seen = root in self.refs
        self.refs[root] = self.refs.get(root, 0) + 1
        if not seen:
            self._expand(root, 0, 1 << 64, 0, True, dev_id)
        elif root not in self.height:
            raise MetadataError(f"mapping tree of device {dev_id}: root is inside another "
                                "tree's path (a cycle?)", block=root)

    def _leaves(self, batch: LeafBatch, dev_id: int) -> None:
        """Record leaves read for the first time (validated by the caller)."""
        full = batch.counts > 0  # empty leaves (allowed here) own no keys
        if batch.first is not None and batch.last is not None:
            firsts, lasts = batch.first.tolist(), batch.last.tolist()
        else:
            ends = np.cumsum(batch.counts)
            firsts = batch.keys[(ends - batch.counts)[full]].tolist()
            lasts = batch.keys[ends[full] - 1].tolist()
        blocks = batch.blocks.tolist()
        # dict updates from zips: tens of thousands of leaves at C speed
        self.leaf_entries.update(zip(blocks, batch.counts.tolist(), strict=True))
        self.height.update(dict.fromkeys(blocks, 0))
        if len(firsts) < len(blocks):
            self.span.update(dict.fromkeys(blocks))  # empty leaves keep None
            blocks = batch.blocks[full].tolist()
        self.span.update(zip(blocks, zip(firsts, lasts, strict=True), strict=True))
        if self.visit is not None:
            self.visit(batch, dev_id)

    def _leaf_group(self, node: Node, hi: int, dev_id: int) -> bool:
        """The children of ``node`` as one batch of fresh leaves; False if they are not
        (shared, repeated, internal or damaged: the one-node path then decides)."""
        kids = node.values(U64).astype(np.int64)
        first = int(kids[0])
        if not (0 <= first < self.reader.nr_blocks) or \
                self.reader.block(first)[4] != BTREE_LEAF:
            return False
        kid_list = kids.tolist()
        if not self.refs.keys().isdisjoint(kid_list) or len(set(kid_list)) != len(kid_list):
            return False
        # thin_ls 1.1 rejects underfull leaves; we list them (as the one-node path does)
        batch = validated_leaves(self.reader, kids, node.keys.copy(), hi, root=True,
                                 value_size=MAPPING_VALUE_SIZE, values=self.entries,
                                 keys=self.entries)
        if batch is None:
            return False
        self.refs.update(dict.fromkeys(kid_list, 1))
        self._leaves(batch, dev_id)
        return True

    def _expand(self, blocknr: int, lo: int, hi: int, depth: int, is_root: bool,
                dev_id: int) -> None:
        what = f"mapping tree of device {dev_id}"
        if depth > MAX_DEPTH:
            raise MetadataError(f"{what}: tree deeper than {MAX_DEPTH} levels (a cycle?)",
                                block=blocknr)
        try:
            node = read_node(self.reader, blocknr, MAPPING_VALUE_SIZE)
        except MetadataError as err:
            err.detail = f"{what}: {err.detail}"
            raise
        keys = node.keys
        nr = node.nr_entries
        # thin_ls 1.1 rejects underfull nodes; dmimage lists them (docs/tools.md)
        problem = order_problem(node, lo, hi, what)
        if problem is not None:
            raise problem
        if node.is_leaf:
            vals = node.values(U64)
            self._leaves(LeafBatch(np.array([blocknr], np.int64), np.array([nr], np.int64),
                                   keys, vals), dev_id)
            return
        kids = node.values(U64).tolist()
        self.children[blocknr] = kids
        if depth + 1 <= MAX_DEPTH and self._leaf_group(node, hi, dev_id):
            self.height[blocknr] = 1
            spans = [s for s in (self.span[c] for c in kids) if s is not None]
            self.span[blocknr] = (spans[0][0], spans[-1][1]) if spans else None
            return
        key_list = keys.tolist()
        self._stack.add(blocknr)
        height = -1
        for i, child in enumerate(kids):
            if child in self._stack:
                raise MetadataError(f"{what}: node {blocknr} points back at {child} (a cycle)",
                                    block=blocknr)
            seen = child in self.refs
            self.refs[child] = self.refs.get(child, 0) + 1
            child_hi = key_list[i + 1] if i + 1 < nr else hi
            if not seen:
                self._expand(child, key_list[i], child_hi, depth + 1, False, dev_id)
            else:
                # a subtree read under another parent must fit this parent's range too (as
                # check and dump require): its keys are found through this parent
                span = self.span.get(child)
                if span is not None and not (key_list[i] <= span[0] and span[1] < child_hi):
                    raise MetadataError(f"{what}: shared subtree keys {span[0]}..{span[1]} "
                                        f"outside the parent's range {key_list[i]}.."
                                        f"{child_hi - 1}", block=child, field="keys")
            h = self.height[child]
            if height not in (-1, h):
                raise MetadataError(f"{what}: leaves at different depths", block=blocknr)
            height = h
        self._stack.discard(blocknr)
        self.height[blocknr] = height + 1
        spans = [s for s in (self.span.get(c) for c in kids) if s is not None]
        self.span[blocknr] = (spans[0][0], spans[-1][1]) if spans else None

    def summaries(self, roots: list[int], multi_per_leaf: dict[int, int]
                  ) -> list[tuple[int, int, int]]:
        """(mapped, shared, highest key) of each root; ``multi_per_leaf``: for leaves
        referenced once, how many of their mappings have a data block counted twice."""
        memo: dict[int, tuple[int, int, int]] = {}
        for b, n in self.leaf_entries.items():
            span = self.span[b]
            high = span[1] if span is not None else 0
            shared = n if self.refs[b] > 1 else multi_per_leaf.get(b, 0)
            memo[b] = (n, shared, high)

        def summary(b: int) -> tuple[int, int, int]:
            got = memo.get(b)
            if got is not None:
                return got
            mapped = shared = high = 0
            for child in self.children[b]:
                m, s, h = summary(child)
                if m:
                    high = h
                mapped += m
                shared += s
            if self.refs[b] > 1:
                shared = mapped
            memo[b] = (mapped, shared, high)
            return memo[b]

        return [summary(r) for r in roots]


class DataCounts:
    """How many distinct leaves name each data block, counted a batch of leaves at a time
    (thin/datarefs.py: in process, or in a forked child for a big pool) into one array the
    size of the data device (what the data space map holds); blocks past it (damaged
    metadata) are kept aside. :meth:`finish` before asking :meth:`multi`."""

    def __init__(self, pool: Pool, nr_data_blocks: int, *, fork: bool = True):
        self.census = census(pool.reader, nr_data_blocks,
                             pool.live_superblock.data_sm.nr_allocated, keep_beyond=True,
                             fork=fork)
        self.counts = self.census.counts
        self.beyond: list[np.ndarray] = []

    @property
    def by_block(self) -> bool:
        """Whether batches may come without their entries (read by block number)."""
        return self.census.by_block

    def add(self, batch: LeafBatch, _dev_id: int) -> None:
        if len(batch.values) < int(batch.counts.sum()):  # entries left out: by block number
            self.census.leaves(0, batch.blocks)
        elif len(batch.values):
            self.census.values(0, mapping_blocks(batch.values))

    def finish(self) -> None:
        self.counts, tallies = self.census.finish()
        self.beyond = [v for t in tallies.values() for v in t.values]

    def close(self) -> None:
        self.census.close()

    def multi(self, data: np.ndarray) -> np.ndarray:
        """Which of ``data`` are named by more than one leaf entry."""
        n = len(self.counts)
        inside = data < np.uint64(n)
        out = np.zeros(len(data), bool)
        out[inside] = self.counts[data[inside].astype(np.intp)] > 1
        if self.beyond and not inside.all():
            extra, cnt = np.unique(np.concatenate(self.beyond), return_counts=True)
            far = data[~inside]
            i = np.minimum(np.searchsorted(extra, far), len(extra) - 1)
            out[~inside] = (extra[i] == far) & (cnt[i] > 1)
        return out

    def any_multi(self) -> bool:
        if len(self.counts) and int(self.counts.max()) > 1:
            return True
        if self.beyond:
            return len(np.unique(np.concatenate(self.beyond))) < sum(map(len, self.beyond))
        return False


def _multi_per_leaf(pool: Pool, forest: MappingForest, data: DataCounts) -> dict[int, int]:
    """Mappings with a data block counted twice, per leaf referenced once (a second read of
    those leaves, in batches; skipped when no data block is counted twice)."""
    if not data.any_multi():
        return {}
    once = np.array([b for b, n in forest.leaf_entries.items() if n and forest.refs[b] == 1],
                    np.int64)
    out: dict[int, int] = {}
    step = leaves.BATCH_LEAVES
    for s in range(0, len(once), step):
        batch = gather_leaves(pool.reader, once[s:s + step])
        pool.reader.drop_pages()
        multi = data.multi(mapping_blocks(batch.values)).astype(np.int64)
        starts = np.cumsum(batch.counts) - batch.counts
        sums = np.add.reduceat(multi, starts)
        out.update(zip(batch.blocks.tolist(), sums.tolist(), strict=True))
    return out


def device_usage(pool: Pool, *, counting: bool = True,
                 progress: Progress | None = None) -> list[DeviceUsage]:
    """Every device's usage in dev_id order. ``counting=False`` reads the details only
    (all counts 0), as thin_ls does when no counting field is asked for. ``progress``:
    told the metadata blocks in use, then each batch of leaves read (leaves are nearly all
    of them)."""
    details = pool.devices()
    if not counting:
        return [DeviceUsage(d, 0, 0, 0) for d in details.values()]
    try:
        return _usage(pool, details, progress, fork=True)
    except CensusFailed:  # the counting child failed (thin/datarefs.py): count in process
        return _usage(pool, details, progress, fork=False)


def _usage(pool: Pool, details: dict[int, DeviceDetails], progress: Progress | None, *,
           fork: bool) -> list[DeviceUsage]:
    roots = pool.mapping_roots()
    try:
        nr_data = pool.nr_data_blocks()
    except MetadataError:
        # A data size no metadata device could map only sizes the counting array: every
        # block is then counted aside, as blocks past a plausible size are (thin_ls 0.9
        # lists such a pool too; check names the field).
        nr_data = 0
    if progress is not None:
        progress.set_total(pool.live_superblock.metadata_sm.nr_allocated)
    data = DataCounts(pool, nr_data, fork=fork)

    def visit(batch: LeafBatch, dev_id: int) -> None:
        data.add(batch, dev_id)
        blocks = batch.blocks
        pool.reader.drop_pages(int(blocks.min()), int(blocks.max()))
        if progress is not None:
            progress(len(blocks))

    tree = MappingForest(pool, visit, entries=not data.by_block)
    ids = sorted(roots)
    try:
        for dev_id in ids:
            tree.add_root(roots[dev_id], dev_id)
        data.finish()
    finally:
        data.close()
    sums = tree.summaries([roots[i] for i in ids], _multi_per_leaf(pool, tree, data))
    return [DeviceUsage(details[i], m, s, h) for i, (m, s, h) in zip(ids, sums, strict=True)]


def _value(field: str, u: DeviceUsage, bs: int) -> int:
    d = u.details
    if field == "DEV":
        return u.dev_id
    if field == "TRANSACTION":
        return d.transaction_id
    if field == "CREATE_TIME":
        return d.creation_time
    if field == "SNAP_TIME":
        return d.snapshotted_time
    kind, _, unit = field.partition("_")
    if field == "HIGHEST_MAPPED":
        unit = "BYTES"
    if kind == "HIGHEST":
        h = u.highest_block
        if unit in ("BLOCK", ""):
            v = h
        elif unit == "SECTOR":
            v = (h + 1) * bs - 1
        else:
            v = ((h + 1) * bs << 9) - 1
        return v & _U64_MASK
    blocks = {"MAPPED": u.mapped_blocks, "EXCLUSIVE": u.exclusive_blocks,
              "SHARED": u.shared_blocks}[kind]
    if unit == "BLOCKS":
        return blocks
    if unit == "SECTORS":
        return (blocks * bs) & _U64_MASK
    return (blocks * bs << 9) & _U64_MASK


def _cell(field: str, u: DeviceUsage, bs: int) -> str:
    v = _value(field, u, bs)
    return pretty_size(v) if field in _HUMAN else str(v)


def needs_counting(fields: Iterable[str]) -> bool:
    return any(f not in _NON_COUNTING for f in fields)


def ls_table(
    pool: Pool, fields: Iterable[str] = DEFAULT_FIELDS, *, headers: bool = True,
    progress: Progress | None = None,
) -> list[list[str]]:
    """The table thin_ls prints, as rows of cells (header row first unless ``headers=False``)."""
    fields = list(fields)
    usage = device_usage(pool, counting=needs_counting(fields), progress=progress)
    if not fields:
        return []
    bs = pool.superblock.data_block_size
    rows = [fields] if headers else []
    rows += [[_cell(f, u, bs) for f in fields] for u in usage]
    return rows


def render_grid(rows: list[list[str]]) -> str:
    """Right-align each column to its widest cell, one space after every cell."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows)))]
    lines = ("".join(c.rjust(w) + " " for c, w in zip(r, widths, strict=False)) for r in rows)
    return "".join(line + "\n" for line in lines)


def ls_json(pool: Pool, fields: Iterable[str] = DEFAULT_FIELDS, *,
            progress: Progress | None = None) -> str:
    """``{"data_block_size": N, "fields": [...], "devices": [{FIELD: value}, ...]}``; numbers
    as integers, the human-unit fields as thin_ls's strings."""
    import json  # only here: a command's start-up does not pay for it
    fields = list(fields)
    usage = device_usage(pool, counting=needs_counting(fields), progress=progress)
    bs = pool.superblock.data_block_size
    devices = [{f: (pretty_size(_value(f, u, bs)) if f in _HUMAN else _value(f, u, bs))
                for f in fields} for u in usage]
    return json.dumps({"data_block_size": bs, "fields": fields, "devices": devices},
                      indent=2) + "\n"
