"""cache_check: the superblock, the mapping, hint, dirty and discard arrays, and the
metadata space map against every reference found.

The rules and their verdicts follow thin-provisioning-tools 1.1's cache_check (which the
tests run side by side); dmimage also refuses a wrong magic or block number in the
superblock, as the kernel does. A leak (a block counted once that nothing references) fails
the check like cache_check without --ignore-non-fatal-errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from dmimage.cache.metadata import CacheSuperblock, parse_superblock
from dmimage.errors import MetadataError
from dmimage.format.cache import M_DIRTY, M_VALID, MAPPING_FLAG_BITS
from dmimage.pdata.array import read_array, read_bitset
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import BtreeWalker
from dmimage.pdata.spacemap import read_space_map

T = TypeVar("T")

#: Examples named per finding.
EXAMPLES = 5


@dataclass
class CacheCheckReport:
    problems: list[str] = field(default_factory=list)
    #: leaks are listed in ``problems`` too; counted here for --json
    leaked_metadata_blocks: list[int] = field(default_factory=list)
    nr_mappings: int = 0
    nr_dirty: int = 0
    version: int = 0
    #: the metadata space map's nr_allocated and nr_blocks (dmsetup status's used/total)
    metadata_used: int = 0
    metadata_total: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _mapping_problems(sb: CacheSuperblock, maps: np.ndarray, dirty: np.ndarray | None
                      ) -> list[str]:
    out: list[str] = []
    flags = maps & np.uint64((1 << MAPPING_FLAG_BITS) - 1)
    oblock = maps >> np.uint64(MAPPING_FLAG_BITS)
    valid = (flags & np.uint64(M_VALID)).astype(bool)
    allowed = M_VALID | M_DIRTY if sb.version == 1 else M_VALID

    def name(kind: str, idx: np.ndarray) -> None:
        if len(idx):
            out.append(f"mapping array: {len(idx)} cache blocks {kind} (e.g. cache block "
                       f"{', '.join(str(i) for i in idx[:EXAMPLES].tolist())})")

    name("with unknown flags", np.flatnonzero(flags & np.uint64(~allowed & 0xFFFF)))
    if dirty is None:
        dirty_unmapped = ~valid & (flags & np.uint64(M_DIRTY)).astype(bool)
    else:
        d = np.zeros(len(maps), bool)
        d[:min(len(dirty), len(maps))] = dirty[:len(maps)]
        dirty_unmapped = ~valid & d
    name("dirty but unmapped", np.flatnonzero(dirty_unmapped))
    name("unmapped but naming an origin block", np.flatnonzero(~valid & (oblock > 0)))
    if sb.clean_shutdown and sb.discard_block_size and sb.discard_nr_blocks and \
            sb.data_block_size:
        nr_origin = sb.discard_block_size * sb.discard_nr_blocks // sb.data_block_size
        name(f"mapped beyond the origin's end ({nr_origin} blocks)",
             np.flatnonzero(valid & (oblock >= np.uint64(nr_origin))))
    vo = oblock[valid]
    if _any_repeated(vo):  # rare: find which cache blocks, in order
        order = np.argsort(vo, kind="stable")
        dup = order[1:][vo[order][1:] == vo[order][:-1]]
        name("mapping an origin block already mapped", np.sort(np.flatnonzero(valid)[dup]))
    return out


def _any_repeated(values: np.ndarray) -> bool:
    """Whether a value occurs twice: a mark per value when the values are dense enough (a
    pass over n values and a bitmap), else a sort."""
    n = len(values)
    if n < 2:
        return False
    top = int(values.max())
    if top < max(64 * n, 1 << 20):
        marks = np.zeros(top + 1, bool)
        marks[values] = True
        return int(np.count_nonzero(marks)) != n
    s = np.sort(values)
    return bool((s[1:] == s[:-1]).any())


def check_cache(path: str) -> CacheCheckReport:
    """Every problem found; raises only when the superblock itself is unusable."""
    rep = CacheCheckReport()
    with BlockReader(path) as reader:
        sb = parse_superblock(reader.block(0))
        rep.version = sb.version
        rep.metadata_used = sb.metadata_sm.nr_allocated
        rep.metadata_total = sb.metadata_sm.nr_blocks
        counts = np.zeros(reader.nr_blocks, np.uint32)
        counts[0] = 1
        walker = BtreeWalker(reader, meta_counts=counts)

        def guarded(fn: Callable[[], T]) -> T | None:
            try:
                return fn()
            except MetadataError as err:
                rep.problems.append(str(err))
                return None

        dirty = None
        if sb.version >= 2:
            if sb.dirty_root == 0:
                rep.problems.append("superblock: version 2 without a dirty bitset (dirty_root 0)")
                return rep
            dirty = guarded(lambda: read_bitset(walker, sb.dirty_root, sb.cache_blocks,
                                                         "dirty bitset"))
        arr = guarded(lambda: read_array(walker, sb.mapping_root, 8,
                                                     "mapping array"))
        if arr is not None:
            maps = arr.values.reshape(-1).view("<u8").astype(np.uint64)
            rep.problems += _mapping_problems(sb, maps, dirty)
            valid = (maps & np.uint64(M_VALID)).astype(bool)
            rep.nr_mappings = int(valid.sum())
            if dirty is not None:
                rep.nr_dirty = int((valid[:len(dirty)] & dirty[:len(valid)]).sum())
            else:
                rep.nr_dirty = int((valid & (maps & np.uint64(M_DIRTY)).astype(bool)).sum())
        if sb.hint_root != 0 and sb.policy_hint_size != 0:
            if sb.policy_hint_size != 4:
                rep.problems.append(f"superblock: policy hint size {sb.policy_hint_size} "
                                    "(cache_check supports only 4)")
            else:
                guarded(lambda: read_array(walker, sb.hint_root, 4, "hint array"))
        if sb.discard_root != 0:
            guarded(lambda: read_bitset(walker, sb.discard_root,
                                                    sb.discard_nr_blocks, "discard bitset"))
        if rep.problems:
            return rep
        sm = guarded(lambda: read_space_map(reader, sb.metadata_sm, walker, metadata=True))
        if sm is None:
            return rep
        stored = sm.counts
        expected = np.zeros(len(stored), np.uint32)
        n = min(len(stored), len(counts))
        expected[:n] = counts[:n]
        if len(counts) > len(stored) and counts[len(stored):].any():
            rep.problems.append("metadata space map: referenced blocks lie beyond its nr_blocks")
        diff = np.flatnonzero(stored != expected)
        is_leak = (expected[diff] == 0) & (stored[diff] == 1)
        leaks, wrong = diff[is_leak], diff[~is_leak]  # (np.setdiff1d would import numpy.ma)
        if len(leaks):
            rep.leaked_metadata_blocks = leaks.tolist()
            rep.problems.append(f"metadata space map: {len(leaks)} leaked blocks (e.g. "
                                f"{leaks[:EXAMPLES].tolist()})")
        if len(wrong):
            eg = ", ".join(f"block {b}: stored {int(stored[b])}, expected {int(expected[b])}"
                           for b in wrong[:EXAMPLES].tolist())
            rep.problems.append(f"metadata space map: {len(wrong)} blocks with wrong reference "
                                f"counts ({eg})")
    return rep
