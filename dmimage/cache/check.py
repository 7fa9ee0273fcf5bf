"""cache_check: the superblock, the mapping, hint, dirty and discard arrays, and the
metadata space map against every reference found.

The rules and their verdicts follow thin-provisioning-tools 1.1's cache_check (which the
tests run side by side); dmimage also refuses a wrong magic or block number in the
superblock, as the kernel does. A leak (a block counted once that nothing references) fails
the check like cache_check without --ignore-non-fatal-errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

from dmimage.cache.check_report import CacheCheckReport
from dmimage.cache.mapping_rules import EXAMPLES, mapping_counts, mapping_problems
from dmimage.cache.superblock import parse_superblock
from dmimage.errors import MetadataError
from dmimage.pdata.array import read_array, read_bitset
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import BtreeWalker
from dmimage.pdata.spacemap import read_space_map

__all__ = ["CacheCheckReport", "check_cache"]

T = TypeVar("T")

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
            rep.problems += mapping_problems(sb, maps, dirty)
            rep.nr_mappings, rep.nr_dirty = mapping_counts(maps, dirty)
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
