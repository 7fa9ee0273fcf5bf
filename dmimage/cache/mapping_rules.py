"""dm-cache's rules for the mapping array's values (cache_check 1.1's verdicts), on whole
arrays: shared by the full checker (cache/check.py) and the clean path
(cache/quick_check.py)."""

from __future__ import annotations

import numpy as np

from dmimage.cache.superblock import CacheSuperblock
from dmimage.format.cache import M_DIRTY, M_VALID, MAPPING_FLAG_BITS

#: Examples named per finding.
EXAMPLES = 5


def mapping_problems(sb: CacheSuperblock, maps: np.ndarray, dirty: np.ndarray | None
                     ) -> list[str]:
    """The mapping array's problems, one line per kind, naming the first cache blocks.

    The flags are read as byte columns of the values and the origin block is compared in
    place (``maps >= n << 16`` is ``oblock >= n``): no whole-array temporaries of flags or
    origin blocks but the mapped ones'."""
    out: list[str] = []
    cols = maps.astype("<u8", copy=False).view(np.uint8).reshape(-1, 8)
    lo, hi = cols[:, 0], cols[:, 1]  # the flags' two bytes
    valid = (lo & M_VALID).view(bool)
    allowed = M_VALID | M_DIRTY if sb.version == 1 else M_VALID

    def name(kind: str, idx: np.ndarray) -> None:
        if len(idx):
            out.append(f"mapping array: {len(idx)} cache blocks {kind} (e.g. cache block "
                       f"{', '.join(str(i) for i in idx[:EXAMPLES].tolist())})")

    name("with unknown flags", np.flatnonzero((lo & (~allowed & 0xFF)) | hi))
    if dirty is None:
        dirty_unmapped = ~valid & (lo & M_DIRTY).astype(bool)
    else:
        d = np.zeros(len(maps), bool)
        d[:min(len(dirty), len(maps))] = dirty[:len(maps)]
        dirty_unmapped = ~valid & d
    name("dirty but unmapped", np.flatnonzero(dirty_unmapped))
    name("unmapped but naming an origin block",
         np.flatnonzero(~valid & (maps >= np.uint64(1 << MAPPING_FLAG_BITS))))
    if sb.clean_shutdown and sb.discard_block_size and sb.discard_nr_blocks and \
            sb.data_block_size:
        nr_origin = sb.discard_block_size * sb.discard_nr_blocks // sb.data_block_size
        if nr_origin << MAPPING_FLAG_BITS < 1 << 64:  # else no origin block lies beyond
            name(f"mapped beyond the origin's end ({nr_origin} blocks)",
                 np.flatnonzero(valid & (maps >= np.uint64(nr_origin << MAPPING_FLAG_BITS))))
    vo = maps[valid] >> np.uint64(MAPPING_FLAG_BITS)
    if any_repeated(vo):  # rare: find which cache blocks, in order
        order = np.argsort(vo, kind="stable")
        dup = order[1:][vo[order][1:] == vo[order][:-1]]
        name("mapping an origin block already mapped", np.sort(np.flatnonzero(valid)[dup]))
    return out


def any_repeated(values: np.ndarray) -> bool:
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


def mapping_counts(maps: np.ndarray, dirty: np.ndarray | None) -> tuple[int, int]:
    """(mapped, dirty) cache blocks: version 2 (``dirty`` given) counts the dirty bitset's
    bits of mapped blocks, version 1 the dirty flag of mapped ones."""
    lo = maps.astype("<u8", copy=False).view(np.uint8)[0::8]  # the flags' low byte
    valid = (lo & M_VALID).view(bool)
    if dirty is not None:
        nr_dirty = int(np.count_nonzero(valid[:len(dirty)] & dirty[:len(valid)]))
    else:
        nr_dirty = int(np.count_nonzero(lo & (M_VALID | M_DIRTY) == M_VALID | M_DIRTY))
    return int(np.count_nonzero(valid)), nr_dirty
