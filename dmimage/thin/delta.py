"""Differences between two thin devices' mappings, as thin_delta 1.1 reports them.

thin_delta 1.1.0's rule (read from its source; reproduced with our own, vectorised code):

* Times are ignored: only virtual -> data block addresses are compared.
* Every virtual block mapped by either side is classified: ``left_only``, ``right_only``,
  ``same`` (both map it to the same data block) or ``different``.
* Maximal runs of *consecutive virtual blocks of one class* are printed; the data blocks
  need not be contiguous within a run. With ``--verbose`` a run's ``data_begin``
  (``left_data_begin``/``right_data_begin`` for ``different``) is the data block of its first
  virtual block, and consecutive runs of one class are grouped in one ``<same>`` (etc.)
  element.
* The superblock line has uuid, time, transaction, flags (only when NEEDS_CHECK is set, as
  ``flags="1"``), data_block_size and nr_data_blocks (from the superblock read: with ``-m``
  the held copy, whose space-map root is zeroed, so 0); no version. No newline at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dmimage.format.constants import MAPPING_VALUE_SIZE
from dmimage.format.values import mapping_blocks
from dmimage.pdata.btree import U64
from dmimage.pdata.leaves import leaf_batches
from dmimage.thin.pool import Pool

if TYPE_CHECKING:
    from dmimage.progress import Progress

__all__ = ["KINDS", "Delta", "diff_mappings", "side_batches", "side_mappings", "stream_diff",
           "delta_xml", "delta_json"]

#: Class codes, in the order of :attr:`Delta.kind` values.
KINDS = ("left_only", "right_only", "same", "different")
LEFT_ONLY, RIGHT_ONLY, SAME, DIFFERENT = range(4)


@dataclass(slots=True)
class Delta:
    """Runs of consecutive virtual blocks of one class (parallel arrays)."""

    kind: np.ndarray  # uint8 index into KINDS
    begin: np.ndarray  # uint64 first virtual block
    length: np.ndarray  # uint64
    left_data: np.ndarray  # uint64 left data block of the first virtual block (0 if none)
    right_data: np.ndarray  # uint64 likewise, right side

    def __len__(self) -> int:
        return len(self.kind)


Side = Iterator[tuple[np.ndarray, np.ndarray]]

#: Leaves per batch of a side: 1 hands each group of sibling leaves (the children of one
#: bottom internal node, up to 252 leaves) over as it is validated, with no copy into a
#: bigger batch. Measured on this project's machine (two devices of 1M fragmented
#: mappings, stream_diff in one process, medians of 9): 22 ms, against 40 ms with
#: pdata/leaves.py's 256 (the concatenated arrays, ~4 MB a side, fall out of the cache).
SIDE_BATCH_LEAVES = 1


def side_batches(pool: Pool, *, dev_id: int | None = None, root: int | None = None,
                 progress: Progress | None = None) -> Side:
    """(virtual, data) arrays of a device, or of the bottom-level tree at ``root``, a batch
    of leaves at a time in key order; ``progress`` hears of each batch's mappings."""
    if dev_id is not None:
        root, what = pool.mapping_root(dev_id), f"mapping tree of device {dev_id}"
    else:
        assert root is not None
        what = f"mapping tree at block {root}"
    for batch in leaf_batches(pool.reader, root, MAPPING_VALUE_SIZE, what,
                              batch=SIDE_BATCH_LEAVES):
        pool.reader.drop_pages()
        if progress is not None:
            progress(len(batch))
        if len(batch):
            yield np.asarray(batch.keys, U64), mapping_blocks(batch.values)


def side_mappings(pool: Pool, *, dev_id: int | None = None, root: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(virtual, data) arrays of a device, or of the bottom-level tree at ``root``."""
    parts = list(side_batches(pool, dev_id=dev_id, root=root))
    if not parts:
        return np.empty(0, U64), np.empty(0, U64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def stream_diff(left: Side, right: Side) -> Delta:
    """:func:`diff_mappings` of two sides read batch by batch: each step classifies the
    keys up to the smaller of the two buffers' last keys, so memory is a batch per side plus
    the runs (the output), not the mappings."""
    empty = np.empty(0, U64)
    lk, ld, rk, rd = empty, empty, empty, empty
    ldone = rdone = False
    parts: list[Delta] = []
    while True:
        while not ldone and not len(lk):
            try:
                lk, ld = next(left)
            except StopIteration:
                ldone = True
        while not rdone and not len(rk):
            try:
                rk, rd = next(right)
            except StopIteration:
                rdone = True
        if not len(lk) and not len(rk):
            break
        # a side still being read may hold keys up to its buffer's last key only
        bounds = [int(k[-1]) for k, done in ((lk, ldone), (rk, rdone)) if not done]
        if bounds:
            bound = np.uint64(min(bounds))
            li = int(np.searchsorted(lk, bound, "right"))
            ri = int(np.searchsorted(rk, bound, "right"))
        else:
            li, ri = len(lk), len(rk)
        parts.append(diff_mappings(lk[:li], ld[:li], rk[:ri], rd[:ri]))
        lk, ld, rk, rd = lk[li:], ld[li:], rk[ri:], rd[ri:]
    return _joined(parts)


def _joined(parts: list[Delta]) -> Delta:
    """The runs of consecutive pieces, a run split at a seam joined again (each piece's own
    runs are maximal, so only seams can join)."""
    if not parts:
        e = np.empty(0, U64)
        return Delta(np.empty(0, np.uint8), e, e.copy(), e.copy(), e.copy())
    kind, begin, length, ld, rd = (np.concatenate([getattr(p, f) for p in parts]) for f in
                                   ("kind", "begin", "length", "left_data", "right_data"))
    n = len(kind)
    if n < 2:
        return Delta(kind, begin, length, ld, rd)
    join = (kind[1:] == kind[:-1]) & (begin[1:] == begin[:-1] + length[:-1])
    if not join.any():
        return Delta(kind, begin, length, ld, rd)
    starts = np.flatnonzero(np.concatenate([[True], ~join]))
    return Delta(kind[starts], begin[starts], np.add.reduceat(length, starts).astype(U64),
                 ld[starts], rd[starts])


def _merge(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted union of two ascending, duplicate-free arrays and where each element of ``a``
    and of ``b`` sits in it. A stable argsort merges the two sorted runs in linear time;
    np.union1d's hash-based unique and a binary search per element are many times slower."""
    c = np.concatenate([a, b])
    order = np.argsort(c, kind="stable")
    s = c[order]
    keep = np.ones(len(s), bool)
    keep[1:] = s[1:] != s[:-1]
    pos = np.empty(len(c), np.int64)
    pos[order] = np.cumsum(keep) - 1
    return s[keep], pos[:len(a)], pos[len(a):]


def _classified(lo: np.ndarray, ld: np.ndarray, ro: np.ndarray, rd: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The union of both sides' virtual blocks, each one's class, and both sides' data
    blocks at it (0 where a side has none)."""
    union, pl, pr = _merge(lo, ro)
    n = len(union)
    in_l, in_r = np.zeros(n, bool), np.zeros(n, bool)
    dl, dr = np.zeros(n, U64), np.zeros(n, U64)
    in_l[pl] = True
    in_r[pr] = True
    dl[pl] = ld
    dr[pr] = rd
    kind = np.where(in_l & in_r, np.where(dl == dr, SAME, DIFFERENT),
                    np.where(in_l, LEFT_ONLY, RIGHT_ONLY)).astype(np.uint8)
    return union, kind, dl, dr


def diff_mappings(left_origin: np.ndarray, left_data: np.ndarray, right_origin: np.ndarray,
                  right_data: np.ndarray) -> Delta:
    """Classify the union of both sides' virtual blocks and cut it into thin_delta's runs.
    Origins must be ascending and unique on each side."""
    lo = np.asarray(left_origin, U64)
    ro = np.asarray(right_origin, U64)
    if len(lo) == len(ro) and np.array_equal(lo, ro):
        # both sides map the same virtual blocks (a snapshot and its origin, mostly): no
        # merge, every block is same or different
        union, dl, dr = lo, np.asarray(left_data, U64), np.asarray(right_data, U64)
        kind = np.where(dl == dr, np.uint8(SAME), np.uint8(DIFFERENT))
    else:
        union, kind, dl, dr = _classified(lo, np.asarray(left_data, U64), ro,
                                          np.asarray(right_data, U64))
    n = len(union)
    if n == 0:
        e = np.empty(0, U64)
        return Delta(np.empty(0, np.uint8), e, e.copy(), e.copy(), e.copy())
    brk = np.ones(n, bool)
    if n > 1:
        brk[1:] = ((union[1:] - union[:-1]) != 1) | (kind[1:] != kind[:-1])
    starts = np.flatnonzero(brk)
    length = np.diff(np.append(starts, n)).astype(U64)
    return Delta(kind[starts], union[starts], length, dl[starts], dr[starts])


def _superblock_line(pool: Pool) -> str:
    sb = pool.superblock
    flags = ' flags="1"' if sb.needs_check else ""
    return (f'<superblock uuid="" time="{sb.time}" transaction="{sb.trans_id}"{flags} '
            f'data_block_size="{sb.data_block_size}" nr_data_blocks="{sb.nr_data_blocks}">\n')


def delta_xml(pool: Pool, left: tuple[str, int], right: tuple[str, int], d: Delta, *,
              verbose: bool = False) -> str:
    """thin_delta 1.1's XML. ``left``/``right``: ("left", dev_id) or ("left_root", block)
    and ("right", ...) / ("right_root", ...), the ``<diff>`` attributes."""
    parts = [_superblock_line(pool),
             f'  <diff {left[0]}="{left[1]}" {right[0]}="{right[1]}">\n']
    kinds = d.kind.tolist()
    begins = d.begin.tolist()
    lengths = d.length.tolist()
    if not verbose:
        parts += [f'    <{KINDS[k]} begin="{b}" length="{n}"/>\n'
                  for k, b, n in zip(kinds, begins, lengths, strict=True)]
    else:
        lds = d.left_data.tolist()
        rds = d.right_data.tolist()
        current = -1
        for k, b, n, ld, rd in zip(kinds, begins, lengths, lds, rds, strict=True):
            if k != current:
                if current >= 0:
                    parts.append(f"    </{KINDS[current]}>\n")
                parts.append(f"    <{KINDS[k]}>\n")
                current = k
            if k == DIFFERENT:
                parts.append(f'      <range begin="{b}" left_data_begin="{ld}" '
                             f'right_data_begin="{rd}" length="{n}"/>\n')
            else:
                data = rd if k == RIGHT_ONLY else ld
                parts.append(f'      <range begin="{b}" data_begin="{data}" length="{n}"/>\n')
        if current >= 0:
            parts.append(f"    </{KINDS[current]}>\n")
    parts.append("  </diff>\n</superblock>")
    return "".join(parts)


def delta_json(pool: Pool, left: tuple[str, int], right: tuple[str, int], d: Delta) -> str:
    """The same runs as JSON: ``{"superblock": {...}, "left": ..., "right": ...,
    "runs": [[kind, begin, length, left_data|null, right_data|null], ...]}``."""
    import json  # only here: a command's start-up does not pay for it
    sb = pool.superblock
    runs = []
    for k, b, n, ld, rd in zip(d.kind.tolist(), d.begin.tolist(), d.length.tolist(),
                               d.left_data.tolist(), d.right_data.tolist(), strict=True):
        runs.append([KINDS[k], b, n, None if k == RIGHT_ONLY else ld,
                     None if k == LEFT_ONLY else rd])
    doc = {
        "superblock": {"time": sb.time, "transaction": sb.trans_id,
                       "flags": 1 if sb.needs_check else 0,
                       "data_block_size": sb.data_block_size,
                       "nr_data_blocks": sb.nr_data_blocks},
        left[0]: left[1], right[0]: right[1],
        "runs": runs,
    }
    return json.dumps(doc) + "\n"
