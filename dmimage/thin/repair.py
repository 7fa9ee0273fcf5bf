"""Salvage of damaged thin-pool metadata into a fresh pool (``dmimage repair``,
``dmimage dump --repair``).

Salvage (:func:`salvage` -> IR, :func:`repair` -> new metadata file) reads the input read-only
and never writes it. See docs/repair.md for the strategy and how it compares with thin_repair
1.1. The in-place fixes of ``dmimage check --auto-repair`` live in ``thin/fix.py``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from dmimage import devlock
from dmimage.errors import MetadataError, UsageError
from dmimage.extents import data_ranges
from dmimage.format.checksum import checksum_ok
from dmimage.format.constants import (
    BLOCK_SIZE,
    BTREE_HEADER_SIZE,
    BTREE_INTERNAL,
    BTREE_LEAF,
    DEVICE_DETAILS_SIZE,
    ENTRIES_PER_BITMAP,
    INTERNAL_VALUE_SIZE,
    KEY_END,
    MAPPING_VALUE_SIZE,
    MAX_DATA_BLOCK,
    MAX_DUMP_DEV_ID,
    SALT_BTREE_NODE,
    SALT_SUPERBLOCK,
    SUPERBLOCK_MAGIC,
    SUPERBLOCK_VERSION,
    max_entries,
    valid_data_block_size,
)
from dmimage.format.layouts import BTREE_HEADER_DTYPE, BTREE_HEADER_STRUCT
from dmimage.format.superblock import Superblock
from dmimage.format.values import (
    DEVICE_DETAILS_DTYPE,
    MAPPING_VALUE_DTYPE,
    DeviceDetails,
    mapping_blocks,
    unpack_details,
    unpack_mappings,
)
from dmimage.output_file import refuse_writing_input
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import MAX_DEPTH, Node, node_view, order_problem, parse_node
from dmimage.progress import Phases

if TYPE_CHECKING:
    from dmimage.progress import Progress
    from dmimage.thin.ir import PoolIR
    from dmimage.thin.repair_roots import TreeFinder

__all__ = [
    "Overrides", "SalvageReport", "salvage", "repair", "RepairResult",
]


# ============================================================================ salvage

#: A kernel internal node's capacity (lenient_internal accepts no other).
_INTERNAL_MAX_ENTRIES = max_entries(INTERNAL_VALUE_SIZE)


@dataclass(slots=True)
class Overrides:
    """thin_repair's superblock overrides (needed when the superblock is unreadable)."""

    transaction_id: int | None = None
    data_block_size: int | None = None
    nr_data_blocks: int | None = None


@dataclass(slots=True)
class SalvageReport:
    """How the pool was recovered and what was lost."""

    #: "superblock": the superblock's roots were used; "scan": roots found by scanning.
    source: str = "superblock"
    notes: list[str] = field(default_factory=list)
    nr_devices: int = 0
    nr_mappings: int = 0
    #: unreadable nodes skipped (each may hide many mappings)
    lost_nodes: int = 0
    #: mappings dropped from readable leaves (out of key range, beyond the data device)
    dropped_mappings: int = 0
    #: devices known to have existed but left out
    dropped_devices: list[int] = field(default_factory=list)
    #: devices whose bottom-level tree was one of several that fit (docs/repair.md)
    ambiguous_devices: list[int] = field(default_factory=list)
    #: device -> where its bottom-level tree came from, when the top-level tree was rebuilt
    tree_sources: dict[int, str] = field(default_factory=dict)


#: (leaf id, keys, values) of one salvaged leaf
_Leaf = tuple[int, np.ndarray, np.ndarray]


@dataclass(slots=True)
class _Info:
    """What scanning learnt about a subtree (as thin_repair's node collector does)."""

    kind: str  # "top" | "map" | "details"
    nr_entries: int = 0  # devices (top, details) or mappings (map)
    nr_mappings: int = 0
    age: int = 0  # newest time seen
    max_tid: int = 0
    highest_data_block: int = -1
    first_key: int = KEY_END
    last_key: int = -1


def _data_block_ranges(reader: BlockReader) -> list[tuple[int, int]]:
    """[first, end) block ranges of ``reader``'s device that may hold anything but zeros: a
    regular file's data extents (SEEK_DATA/SEEK_HOLE), else the whole device. A hole reads
    as zeros, which no node header is, and reading it through the mapping would fault in a
    zeroed page per block: a metadata file is mostly holes (the fuzz harness's inputs use a
    few dozen of 512 blocks; a scan of them was ~60% of a salvage's CPU)."""
    whole = [(0, reader.nr_blocks)]
    try:
        fd = os.open(reader.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return whole
    try:
        st = os.fstat(fd)
        # a window (metadata inside a larger file) maps less than the whole file
        if not stat.S_ISREG(st.st_mode) or st.st_size != reader.size:
            return whole
        out: list[tuple[int, int]] = []
        for off, n in data_ranges(fd, 0, reader.size):
            first, last = off // BLOCK_SIZE, min(-(-(off + n) // BLOCK_SIZE), reader.nr_blocks)
            if first < last:
                out.append((first, last))
        return out
    except OSError:
        return whole
    finally:
        os.close(fd)


class _Salvager:
    def __init__(self, reader: BlockReader, report: SalvageReport,
                 progress: Phases | None = None):
        self.reader = reader
        #: told of the blocks classified by a scan (a pass of its own)
        self.progress = progress
        self.n = reader.nr_blocks
        self.report = report
        self._strict: dict[int, Node | None] = {}
        self._infos: dict[int, _Info | None] | None = None
        self._referenced: set[int] = set()
        self._walks: dict[tuple[int, object], tuple[list[_Leaf], int]] = {}
        self._pseudo = self.n

    # -- nodes ------------------------------------------------------------------------
    def node(self, b: int, *, own_location: bool = True) -> Node | None:
        """The node at ``b`` if it passes every check of the kernel's validator and thin_check's
        node checks (checksum, then pdata/btree.py's header and key-order rules).

        ``own_location=False`` accepts a wrong blocknr field: the content is still protected
        by the checksum (thin_repair 1.1 does not look at a leaf's blocknr either)."""
        key = b if own_location else -1 - b
        if key in self._strict:
            return self._strict[key]
        got = None
        if 0 <= b < self.n:
            block = self.reader.block(b)
            if checksum_ok(block, SALT_BTREE_NODE):
                try:
                    got = parse_node(block, b, None, check_blocknr=own_location)
                except MetadataError:
                    got = None
                if got is not None and order_problem(got, 0, KEY_END, "salvage") is not None:
                    got = None
        self._strict[key] = got
        return got

    def lenient_internal(self, b: int) -> Node | None:
        """An internal node whose checksum or value_size field is damaged but whose header is
        otherwise that of a kernel internal node: its child pointers are still usable, as
        every child is validated on its own (checksum, blocknr, key range)."""
        if not 0 <= b < self.n:
            return None
        block = self.reader.block(b)
        _csum, flags, own, nr, mx, _vs, _ = BTREE_HEADER_STRUCT.unpack_from(block)
        if flags != BTREE_INTERNAL or own != b or mx != _INTERNAL_MAX_ENTRIES or nr > mx:
            return None
        node = node_view(block, b, False, nr, mx, INTERNAL_VALUE_SIZE)
        return None if order_problem(node, 0, KEY_END, "salvage") is not None else node

    # -- tolerant walks ---------------------------------------------------------------
    def walk(self, root: int, vs: int,
             keep: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
             progress: Callable[[int], None] | None = None) -> tuple[list[_Leaf], int]:
        """Leaves of one tree in key order, skipping whatever is unreadable.

        Returns ([(leaf id, keys, values)], nodes lost). A leaf taken whole keeps its block
        number as id (so sharing between devices survives); a leaf with entries dropped (out
        of the parent's key range, not ascending after the previous leaf, or refused by
        ``keep(keys, values) -> mask``) gets a fresh id above the device's block numbers.
        ``progress`` hears of the entries of each leaf read (all of them at once for a tree
        walked before).
        """
        cache_key = (root, vs)
        if keep is None and cache_key in self._walks:
            if progress is not None:
                progress(sum(len(leaf[1]) for leaf in self._walks[cache_key][0]))
            return self._walks[cache_key]
        dtype = _value_dtype(vs)
        out: list[tuple[int, np.ndarray, np.ndarray]] = []
        lost = 0
        last = -1
        ancestors: set[int] = set()

        def visit(b: int, lo: int, hi: int, depth: int) -> None:
            nonlocal lost, last
            if depth > MAX_DEPTH or b in ancestors:
                lost += 1
                return
            node = self.node(b)
            if node is None:
                node = self.node(b, own_location=False)
            if node is None:
                node = self.lenient_internal(b)
            if node is None or (node.is_leaf and node.value_size != vs):
                lost += 1
                return
            keys = node.keys
            if node.is_leaf:
                if progress is not None:
                    progress(len(keys))
                vals = node.values(dtype)
                lo_eff = max(lo, last + 1)
                mask = keys >= np.uint64(lo_eff)
                if hi < KEY_END:
                    mask &= keys < np.uint64(hi)
                if keep is not None and len(keys):
                    mask &= keep(keys, vals)
                kept = int(mask.sum())
                self.report.dropped_mappings += (len(keys) - kept) if vs == MAPPING_VALUE_SIZE \
                    else 0
                if kept == len(keys):
                    if kept:
                        out.append((b, np.array(keys), np.array(vals)))
                elif kept:
                    self._pseudo += 1
                    out.append((self._pseudo, np.array(keys[mask]), np.array(vals[mask])))
                if kept:
                    last = int(keys[mask][-1])
                return
            ancestors.add(b)
            key_list = keys.tolist()
            children = node.values().tolist()
            for i, child in enumerate(children):
                clo = max(key_list[i], lo)
                chi = min(key_list[i + 1], hi) if i + 1 < len(key_list) else hi
                if clo < chi:
                    visit(child, clo, chi, depth + 1)
            ancestors.discard(b)

        visit(root, 0, KEY_END, 0)
        if keep is None:
            self._walks[cache_key] = (out, lost)
        return out, lost

    def root_readable(self, b: int, vs: int) -> bool:
        node = self.node(b) or self.node(b, own_location=False)
        if node is None:
            node = self.lenient_internal(b)
        return node is not None and (node.is_leaf is False or node.value_size == vs)

    # -- scanning ---------------------------------------------------------------------
    def infos(self) -> dict[int, _Info | None]:
        """Classify every valid btree node of the device (cached)."""
        if self._infos is not None:
            return self._infos
        self._infos = {}
        candidates = self._candidate_blocks()
        if self.progress is not None:
            self.progress.set_total(len(candidates))
        for i, b in enumerate(candidates):
            self._info(b, 0)
            if self.progress is not None and i & 1023 == 1023:
                self.progress(1024)
        if self.progress is not None:
            self.progress(len(candidates) & 1023)
            self.progress.next_pass()
        return self._infos

    def _candidate_blocks(self) -> list[int]:
        """Blocks whose header could be a btree node's (flags 1/2, own location): a vector
        pre-filter so the checksum runs on few blocks. Only the file's data extents are
        read (:func:`_data_block_ranges`)."""
        buf = np.frombuffer(self.reader.buffer(), dtype=np.uint8)
        out: list[int] = []
        step = 65536
        for first, end in _data_block_ranges(self.reader):
            for start in range(first, end, step):
                stop = min(end, start + step)
                view = buf[start * BLOCK_SIZE: stop * BLOCK_SIZE].reshape(stop - start,
                                                                          BLOCK_SIZE)
                hdr = np.ascontiguousarray(view[:, :BTREE_HEADER_SIZE]).view(BTREE_HEADER_DTYPE)
                flags, own = hdr["flags"].reshape(-1), hdr["blocknr"].reshape(-1)
                hit = ((flags == BTREE_INTERNAL) | (flags == BTREE_LEAF)) \
                    & (own == np.arange(start, stop, dtype=np.uint64))
                out.extend((np.flatnonzero(hit) + start).tolist())
        return out

    def _info(self, b: int, depth: int) -> _Info | None:
        infos = self._infos
        assert infos is not None
        if b in infos:
            return infos[b]
        infos[b] = None  # in progress: a cycle reads as invalid
        if depth > MAX_DEPTH:
            return None
        node = self.node(b)
        info: _Info | None = None
        if node is None:
            pass
        elif node.is_leaf and node.value_size == DEVICE_DETAILS_SIZE:
            recs = unpack_details(node.raw_values)
            info = _Info("details", len(recs))
            if recs:
                info.nr_mappings = sum(d.mapped_blocks for d in recs)
                info.max_tid = max(d.transaction_id for d in recs)
                info.age = max(max(d.creation_time, d.snapshotted_time) for d in recs)
        elif node.is_leaf and node.value_size == MAPPING_VALUE_SIZE:
            vals = node.values(MAPPING_VALUE_DTYPE)
            info = self._top_leaf_info(node, vals, depth)
            if info is None:
                info = _Info("map", len(vals), len(vals))
                if len(vals):
                    blocks, times = unpack_mappings(vals)
                    info.age = int(times.max())
                    info.highest_data_block = int(blocks.max())
        elif not node.is_leaf:
            info = self._internal_info(node, depth)
        if info is not None and node is not None and node.is_leaf and len(node.keys):
            info.first_key, info.last_key = int(node.keys[0]), int(node.keys[-1])
        infos[b] = info
        return info

    def _top_leaf_info(self, node: Node, vals: np.ndarray, depth: int) -> _Info | None:
        if not len(vals) or bool((vals >= np.uint64(self.n)).any()):
            return None
        info = _Info("top", len(vals))
        for child in vals.tolist():
            ci = self._info(child, depth + 1)
            if ci is None or ci.kind != "map":
                return None
            info.nr_mappings += ci.nr_mappings
            info.age = max(info.age, ci.age)
            info.highest_data_block = max(info.highest_data_block, ci.highest_data_block)
        self._referenced.update(vals.tolist())
        return info

    def _internal_info(self, node: Node, depth: int) -> _Info | None:
        agg: _Info | None = None
        children = node.values().tolist()
        for child in children:
            ci = self._info(child, depth + 1)
            if ci is None:
                continue
            if agg is None:
                agg = _Info(ci.kind)
            elif ci.kind != agg.kind or (ci.nr_entries and ci.first_key <= agg.last_key):
                return None
            agg.nr_entries += ci.nr_entries
            agg.nr_mappings += ci.nr_mappings
            agg.age = max(agg.age, ci.age)
            agg.max_tid = max(agg.max_tid, ci.max_tid)
            agg.highest_data_block = max(agg.highest_data_block, ci.highest_data_block)
            if ci.nr_entries:
                agg.first_key = min(agg.first_key, ci.first_key)
                agg.last_key = ci.last_key
        if agg is not None:
            self._referenced.update(children)
        return agg

    def roots(self, kind: str) -> list[int]:
        """Unreferenced valid subtrees of one kind, best first (newest, then biggest)."""
        found = [(b, i) for b, i in self.infos().items()
                 if i is not None and i.kind == kind and b not in self._referenced]
        found.sort(key=lambda bi: (-bi[1].age, -bi[1].max_tid, -bi[1].nr_mappings,
                                   -bi[1].nr_entries, bi[0]))
        return [b for b, _ in found]


def _value_dtype(vs: int) -> np.dtype:
    return DEVICE_DETAILS_DTYPE if vs == DEVICE_DETAILS_SIZE else MAPPING_VALUE_DTYPE


def _details_of(s: _Salvager, root: int) -> dict[int, DeviceDetails]:
    leaves, lost = s.walk(root, DEVICE_DETAILS_SIZE)
    s.report.lost_nodes += lost
    out: dict[int, DeviceDetails] = {}
    for _, keys, vals in leaves:
        for k, d in zip(keys.tolist(), unpack_details(vals), strict=True):
            if k <= MAX_DUMP_DEV_ID:
                out[k] = d
    return out


def _top_of(s: _Salvager, root: int) -> dict[int, int]:
    leaves, lost = s.walk(root, MAPPING_VALUE_SIZE)
    s.report.lost_nodes += lost
    out: dict[int, int] = {}
    for _, keys, vals in leaves:
        for k, v in zip(keys.tolist(), vals.tolist(), strict=True):
            if k <= MAX_DUMP_DEV_ID and v < s.n:
                out[k] = v
    return out


def _choose_roots(s: _Salvager, report: SalvageReport, top: dict[int, int] | None,
                  details: dict[int, DeviceDetails] | None, time_limit: int | None = None,
                  data_counts: np.ndarray | None = None
                  ) -> tuple[dict[int, int], dict[int, DeviceDetails] | None]:
    """Fill in whichever of the two trees is missing from the scan (details may stay None:
    the caller regenerates them)."""
    from dmimage.thin.repair_roots import TreeFinder, newest_first, rebuild_top_level

    report.source = "scan"
    if top is None:
        chosen_top: int | None = None
        if details is None:
            details, chosen_top = _newest_details(s, report,
                                                  TreeFinder(s, time_limit, data_counts))
        if details is None:
            tops = s.roots("top")
            if not tops:
                raise MetadataError("no thin-pool btrees found: nothing to salvage")
            report.notes.append(f"scan: mapping tree at block {tops[0]} has no matching "
                                "details tree; device details regenerated")
            return _top_of(s, tops[0]), None
        saved = report.lost_nodes
        tops = newest_first(s.roots("top"), s.n)
        if chosen_top is not None:  # the generation chosen with the details comes first
            tops = [chosen_top] + [t for t in tops if t != chosen_top]
        stale = [_top_of(s, t) for t in tops]
        report.lost_nodes = saved
        report.notes.append(f"top-level mapping tree rebuilt from the bottom-level trees on "
                            f"the device ({len(stale)} stale top-level trees found)")
        return rebuild_top_level(s, report, details, stale, time_limit, data_counts), details
    for d in s.roots("details"):
        dmap = _details_of(s, d)
        if set(dmap) == set(top):
            report.notes.append(f"scan: details tree at block {d} matches the mapping tree")
            return top, dmap
    report.notes.append("no details tree matches the mapping tree: details regenerated")
    return top, None


def _newest_details(s: _Salvager, report: SalvageReport, finder: TreeFinder
                    ) -> tuple[dict[int, DeviceDetails] | None, int | None]:
    """The details tree of the newest consistent generation found by scanning: a details
    tree and a top-level tree whose every device's bottom-level tree is complete and holds
    exactly its mapped_blocks (as thin_repair pairs roots); newest by the latest creation or
    snapshot time, then by where the kernel's metadata allocator wrote the top-level root
    last. Without such a pair, the details tree whose counts some tree fits best."""
    from dmimage.thin.repair_roots import newest_first

    saved = report.lost_nodes
    found = {b: _details_of(s, b) for b in s.roots("details")}
    tops = {t: _top_of(s, t) for t in s.roots("top")}
    report.lost_nodes = saved
    found = {b: d for b, d in found.items() if d}
    if not found:
        return None, None
    top_recency = {b: i for i, b in enumerate(newest_first(list(tops), s.n))}
    recency = {b: i for i, b in enumerate(newest_first(list(found), s.n))}

    def pairs(d: dict[int, DeviceDetails]) -> list[int]:
        out = []
        for t, tmap in tops.items():
            if set(tmap) != set(d):
                continue
            ok = True
            for dev, x in d.items():
                tree = finder.tree(tmap[dev])
                if tree is None or tree.nr_mappings != x.mapped_blocks:
                    ok = False
                    break
            if ok:
                out.append(t)
        return sorted(out, key=lambda t: top_recency[t])

    def fit(d: dict[int, DeviceDetails]) -> int:
        return sum(1 for x in d.values()
                   if x.mapped_blocks == 0 or finder.candidates(x.mapped_blocks))

    def age(d: dict[int, DeviceDetails]) -> int:
        # (not the devices' transaction ids: a deleted device's can exceed every survivor's)
        return max(max(x.creation_time, x.snapshotted_time) for x in d.values())

    paired = {b: p for b, d in found.items() if (p := pairs(d))}
    if paired:
        ranked = sorted(paired, key=lambda b: (-age(found[b]), top_recency[paired[b][0]]))
        best = ranked[0]
        report.notes.append(f"scan: details tree at block {best} and top-level tree at block "
                            f"{paired[best][0]} agree on {len(found[best])} devices "
                            f"({len(paired)} consistent generations found: the newest by "
                            "time, then the metadata allocator's order)")
        if len(ranked) > 1 and age(found[ranked[0]]) == age(found[ranked[1]]) \
                and found[ranked[0]] != found[ranked[1]]:
            report.notes.append("ambiguous: several consistent generations share the newest "
                                "time; the one the allocator wrote last was chosen")
        return found[best], paired[best][0]
    ranked = sorted(found, key=lambda b: (-fit(found[b]), -age(found[b]), recency[b]))
    best = ranked[0]
    report.notes.append(f"scan: details tree at block {best} chosen ({len(found[best])} "
                        "devices; no top-level tree agrees with any details tree)")
    return found[best], None


def _data_counts(reader: BlockReader, ref: Superblock) -> np.ndarray | None:
    """The reference count of every data block by the superblock's data space map, or None
    when that space map is unreadable."""
    from dmimage.pdata.btree import BtreeWalker
    from dmimage.pdata.spacemap import read_space_map

    try:
        return read_space_map(reader, ref.data_sm, BtreeWalker(reader), metadata=False).counts
    except (MetadataError, ValueError, IndexError):
        return None


def _drop_repeated_blocks(lists: dict[int, list[int]],
                          leaf_data: dict[int, tuple[np.ndarray, np.ndarray]]) -> int:
    """Drop every mapping of a data block a device already maps (first in key order wins);
    return how many.

    The kernel never maps one data block to two virtual blocks of a device (only snapshots
    share blocks, across devices), so a repeat is damage -- e.g. an internal node read as a
    leaf, whose child pointers look like mappings of data block 0, or one damaged value -- and
    thin_check 1.1 would reject the count written for it.
    """
    dropped = 0
    for dev in sorted(lists):
        ids = list(dict.fromkeys(lists[dev]))
        parts = [mapping_blocks(leaf_data[i][1]) for i in ids]
        sizes = [len(p) for p in parts]
        if sum(sizes) < 2:
            continue
        blocks = np.concatenate(parts)
        again = np.ones(len(blocks), dtype=bool)
        again[np.unique(blocks, return_index=True)[1]] = False
        if not again.any():
            continue
        ends = np.cumsum(sizes)
        for lid, end, size in zip(ids, ends.tolist(), sizes, strict=True):
            mask = again[end - size:end]
            if mask.any():
                keys, vals = leaf_data[lid]
                leaf_data[lid] = (keys[~mask], vals[~mask])
                dropped += int(mask.sum())
    return dropped


def salvage(path: str | os.PathLike[str], overrides: Overrides | None = None,
            progress: Progress | None = None) -> tuple[PoolIR, SalvageReport]:
    """Recover as much of the pool at ``path`` as can be trusted; returns (PoolIR, report).

    The input is opened read-only. Every node used passes its checksum and location check;
    damaged subtrees are skipped. Roots come from the superblock when it and they are
    readable; otherwise from a scan of every block (thin-format.md; docs/repair.md).
    ``progress``: the scan's blocks (when there is one), then the mappings walked against
    the devices' details (as passes of one task: :class:`~dmimage.progress.Phases`).
    """
    phases = progress if isinstance(progress, Phases) else Phases(progress)
    from dmimage.thin.dump.reader import shared_leaf_items
    from dmimage.thin.ir import DeviceIR, PoolIR, Runs, SuperblockIR

    ov = overrides or Overrides()
    report = SalvageReport()
    with BlockReader(path) as reader:
        s = _Salvager(reader, report, phases)
        block0 = reader.block(0)
        ref = None
        if checksum_ok(block0, SALT_SUPERBLOCK):
            ref = Superblock.unpack(block0)
            if ref.magic != SUPERBLOCK_MAGIC:
                report.notes.append(f"superblock magic {ref.magic} is wrong; its fields are used "
                                    "as hints only")
        else:
            report.notes.append("superblock checksum is wrong: roots found by scanning")
        top: dict[int, int] | None = None
        details: dict[int, DeviceDetails] | None = None
        trusted = ref is not None and ref.magic == SUPERBLOCK_MAGIC
        if trusted:
            assert ref is not None
            if s.root_readable(ref.data_mapping_root, MAPPING_VALUE_SIZE):
                top = _top_of(s, ref.data_mapping_root)
            else:
                report.notes.append(f"mapping tree root (block {ref.data_mapping_root}) is "
                                    "unreadable")
            if s.root_readable(ref.device_details_root, DEVICE_DETAILS_SIZE):
                details = _details_of(s, ref.device_details_root)
            else:
                report.notes.append(f"device details root (block {ref.device_details_root}) "
                                    "is unreadable")
            if ref.held_root:
                report.notes.append("the metadata snapshot is not carried over")
        if top is None or details is None:
            top, details = _choose_roots(s, report, top, details,
                                         ref.time if trusted and ref else None,
                                         _data_counts(reader, ref) if trusted and ref else None)
        elif set(top) != set(details):
            only_top = sorted(set(top) - set(details))
            only_det = sorted(set(details) - set(top))
            if only_det:
                report.dropped_devices.extend(only_det)
                report.notes.append(f"devices in the details tree only (no mappings found), "
                                    f"left out: {only_det[:10]}")
            if only_top:
                report.notes.append(f"devices in the mapping tree only, details regenerated: "
                                    f"{only_top[:10]}")
            top = {k: v for k, v in top.items() if k in details or k in only_top}

        # -- mappings, per device (shared bottom trees are walked once)
        leaf_data: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        lists: dict[int, list[int]] = {}
        # A real pool's data space map has its bitmaps on this metadata device, one per 16320
        # data blocks: a data block beyond that can only be garbage (a damaged value).
        plausible = min(MAX_DATA_BLOCK + 1, s.n * ENTRIES_PER_BITMAP)
        highest = -1
        age = 0
        if details:  # a bar needs a total: without details the walk goes unreported
            phases.set_total(sum(int(d.mapped_blocks) for k, d in details.items() if k in top))
        for dev, root in sorted(top.items()):
            if root < 0:
                lists[dev] = []
                continue
            leaves, lost = s.walk(root, MAPPING_VALUE_SIZE, progress=phases if details else None)
            if (root, "counted") not in s._walks:  # count losses once per shared tree
                report.lost_nodes += lost
                s._walks[(root, "counted")] = ([], 0)
            ids = []
            for lid, keys, vals in leaves:
                leaf_data[lid] = (keys, vals)
                ids.append(lid)
                if len(vals):
                    blocks, times = unpack_mappings(vals)
                    blocks = blocks[blocks < np.uint64(plausible)]
                    if len(blocks):
                        highest = max(highest, int(blocks.max()))
                    age = max(age, int(times.max()))
            lists[dev] = ids
        if details:
            for d in details.values():
                age = max(age, d.creation_time, d.snapshotted_time)

        # -- superblock facts
        dbs = ov.data_block_size if ov.data_block_size is not None else (
            ref.data_block_size if ref is not None else None)
        if dbs is None:
            raise UsageError("the data block size needs to be given (--data-block-size) "
                             "because the superblock is damaged")
        if not valid_data_block_size(int(dbs)):
            raise UsageError(f"invalid data block size {dbs} sectors (give --data-block-size)")
        hints = [v for v in (ov.transaction_id, ref.trans_id if ref else None) if v is not None]
        tid = max(hints) if hints else 0
        nr_hints = [v for v in (ov.nr_data_blocks, ref.data_sm.nr_blocks if trusted and ref
                                else None) if v is not None]
        if report.source == "scan" or not nr_hints:
            nr_hints.append(highest + 1)
            if details:
                tid = max(tid, max(d.transaction_id for d in details.values()) + 1)
        sane = [v for v in nr_hints if v <= plausible]
        if len(sane) < len(nr_hints):
            report.notes.append(f"nr_data_blocks beyond {plausible} (more than this metadata "
                                "device's space map could describe) ignored")
        nr_data = max(sane) if sane else highest + 1
        time = max(ref.time if ref is not None else 0, age + (1 if details is None else 0))
        if details is None:
            tid = max(tid, 1)
            details = {}
        for dev in top:  # devices whose details are lost (as thin_repair regenerates them)
            if dev not in details:
                details[dev] = DeviceDetails(0, max(tid, 1) - 1, time, time)

        # -- mappings beyond the data device are dropped (their leaves become private)
        for lid, (keys, vals) in list(leaf_data.items()):
            bad = mapping_blocks(vals) >= np.uint64(nr_data)
            if bad.any():
                report.dropped_mappings += int(bad.sum())
                leaf_data[lid] = (keys[~bad], vals[~bad])
        report.dropped_mappings += _drop_repeated_blocks(lists, leaf_data)

        def runs_of(ids: list[int]) -> Runs:
            parts = [leaf_data[i] for i in ids if len(leaf_data[i][0])]
            if not parts:
                return Runs.empty()
            keys = np.concatenate([p[0] for p in parts])
            vals = np.concatenate([p[1] for p in parts])
            return Runs.from_blocks(keys, *unpack_mappings(vals))

        devs = sorted(top)
        seqs = [lists[d] for d in devs]
        try:
            per_dev, defs = shared_leaf_items(seqs)
        except MetadataError:
            per_dev, defs = [[(False, q)] if q else [] for q in seqs], []
        ir = PoolIR(SuperblockIR(uuid="", time=time, transaction=tid, flags=0,
                                 version=SUPERBLOCK_VERSION,
                                 data_block_size=int(dbs), nr_data_blocks=nr_data))
        def_sizes: dict[str, int] = {}
        for head, seq in defs:
            r = runs_of(seq)
            ir.defs[str(head)] = r
            def_sizes[str(head)] = r.nr_blocks
        total = 0
        for dev, items in zip(devs, per_dev, strict=True):
            d = details[dev]
            dev_ir = DeviceIR(dev_id=dev, mapped_blocks=0, transaction=d.transaction_id,
                              creation_time=d.creation_time, snap_time=d.snapshotted_time)
            for is_ref, what in items:
                if is_ref:
                    dev_ir.items.append(str(what))
                    dev_ir.mapped_blocks += def_sizes[str(what)]
                else:
                    r = runs_of(what)  # type: ignore[arg-type]
                    dev_ir.items.append(r)
                    dev_ir.mapped_blocks += r.nr_blocks
            total += dev_ir.mapped_blocks
            ir.devices.append(dev_ir)
        report.nr_devices = len(ir.devices)
        report.nr_mappings = total
        return ir, report


@dataclass(slots=True)
class RepairResult:
    report: SalvageReport
    metadata_blocks: int
    blocks_written: int


def repair(input_path: str | os.PathLike[str], output_path: str | os.PathLike[str],
           overrides: Overrides | None = None, progress: Progress | None = None
           ) -> RepairResult:
    """Salvage ``input_path`` (read-only) and write the pool as fresh metadata to the existing
    file or device ``output_path`` (superblock last). The output checks clean.
    ``progress``: one task in passes (:class:`~dmimage.progress.Phases`): the salvage's (a
    scan's blocks, the mappings walked), then each device's mappings as it is written."""
    from dmimage.thin.restore import restore

    refuse_writing_input(input_path, output_path)
    with devlock.acquire_all([(input_path, False), (output_path, True)]):
        phases = Phases(progress)
        ir, report = salvage(input_path, overrides, phases)
        phases.next_pass()
        phases.set_total(sum(int(d.mapped_blocks) for d in ir.devices))
        res = restore(ir, output_path, progress=phases)
    return RepairResult(report, res.metadata_blocks, res.blocks_written)
