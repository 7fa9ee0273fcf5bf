"""Reverse map: which thin blocks map given data-block regions, as thin_rmap 1.1 prints it.

thin_rmap 1.1.0's behaviour (read from its source; reproduced with our own code):

* Devices are walked in dev_id order with *one* walker that never re-reads a node: a leaf (or
  a whole subtree) shared by several devices is reported only for the first (lowest) device
  whose tree reaches it.
* Within that visit order, mappings whose data block lies in any region are taken (regions
  are half-open ``B..E`` and unioned; a run is not split at a region boundary), and
  consecutive taken mappings join one run while the device is the same and both the virtual
  and the data block advance by one. Times are ignored.
* Runs are printed sorted by (data begin, data end, device, virtual begin), one per line:
  ``data B..E -> thin(D) V..W``.
* Always the live superblock (1.1 has no ``-m``; ours accepts one).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dmimage.errors import UsageError
from dmimage.format.values import mapping_blocks
from dmimage.pdata.btree import U64
from dmimage.pdata.leaves import LeafBatch
from dmimage.textrows import CHUNK_ROWS, render_rows
from dmimage.thin.ls import MappingForest
from dmimage.thin.pool import Pool

if TYPE_CHECKING:
    from dmimage.progress import Progress

__all__ = ["RmapRuns", "parse_region", "rmap", "rmap_chunks", "rmap_text", "rmap_json"]


@dataclass(slots=True)
class RmapRuns:
    """Sorted runs: data [data_begin, data_end) -> dev_id's [thin_begin, thin_begin+len)."""

    data_begin: np.ndarray
    data_end: np.ndarray
    dev_id: np.ndarray
    thin_begin: np.ndarray

    def __len__(self) -> int:
        return len(self.data_begin)


def parse_region(text: str) -> tuple[int, int]:
    """``B..E`` (E exclusive, E > B), as thin_rmap accepts it."""
    parts = text.split("..")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise UsageError(f"badly formed region {text!r} (expected BEGIN..END)")
    b, e = int(parts[0]), int(parts[1])
    if b >= 1 << 64 or e >= 1 << 64:
        raise UsageError(f"region {text!r}: number too large")
    if e <= b:
        raise UsageError(f"region {text!r}: end <= begin")
    return b, e


def rmap(pool: Pool, regions: list[tuple[int, int]], progress: Progress | None = None
         ) -> RmapRuns:
    """The runs of every mapping whose data block lies in a region. Leaves are read a batch
    at a time and only the mappings taken are kept (they must be sorted before printing).
    ``progress``: told the metadata blocks in use, then each batch of leaves read."""
    roots = pool.mapping_roots()
    if progress is not None:
        progress.set_total(pool.live_superblock.metadata_sm.nr_allocated)
    taken: list[list[np.ndarray | None]] = []
    bounds = [(np.uint64(lo), np.uint64(hi)) for lo, hi in regions]

    def visit(batch: LeafBatch, dev_id: int) -> None:
        data = mapping_blocks(batch.values)
        blocks = batch.blocks
        take = np.zeros(len(data), bool)
        for lo, hi in bounds:
            take |= (data >= lo) & (data < hi)
        if take.all():
            taken.append([data, np.asarray(batch.keys, U64).copy(),
                          np.full(len(data), dev_id, np.uint32)])
        elif take.any():
            keys = np.asarray(batch.keys, U64)
            taken.append([data[take], keys[take], np.full(int(take.sum()), dev_id, np.uint32)])
        pool.reader.drop_pages(int(blocks.min()), int(blocks.max()))
        if progress is not None:
            progress(len(blocks))

    forest = MappingForest(pool, visit)
    for dev_id in sorted(roots):
        forest.add_root(roots[dev_id], dev_id)
    if not taken:
        e = np.empty(0, U64)
        return RmapRuns(e, e.copy(), e.copy(), e.copy())
    data, keys, devs = (_column(taken, i) for i in range(3))
    taken.clear()
    n = len(data)
    brk = np.ones(n, bool)
    brk[1:] = (devs[1:] != devs[:-1]) | (keys[1:] != keys[:-1] + np.uint64(1)) | (
        data[1:] != data[:-1] + np.uint64(1))
    if bool(brk.all()):  # no two mappings join (a fragmented pool): the columns are the runs
        del brk
        db, tb, dv = data, keys, devs
        de = db + np.uint64(1)
    else:
        starts = np.flatnonzero(brk)
        del brk
        lengths = np.diff(np.append(starts, n)).astype(U64)
        db, tb, dv = data[starts], keys[starts], devs[starts]
        de = db + lengths
        del lengths, starts
    del data, keys, devs
    order = _run_order(db, de, dv, tb)
    # each column permuted in turn: one extra column alive at a time
    db = db[order]
    de = de[order]
    dv = dv[order].astype(U64)
    tb = tb[order]
    return RmapRuns(db, de, dv, tb)


def _column(parts: list[list[np.ndarray | None]], i: int) -> np.ndarray:
    """Column ``i`` of the parts, concatenated; each part's piece is let go as it is copied
    (so the taken mappings are not held twice)."""
    pieces = []
    for p in parts:
        piece = p[i]
        assert piece is not None
        pieces.append(piece)
        p[i] = None
    out = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
    return out


#: Runs sorted with one packed key (data_begin << 24 | index) while both fit in 64 bits.
_INDEX_BITS = 24


def _run_order(db: np.ndarray, de: np.ndarray, dv: np.ndarray, tb: np.ndarray) -> np.ndarray:
    """The order of runs by (data begin, data end, device, virtual begin), as thin_rmap 1.1
    prints them. Data blocks are 40-bit, so with fewer than 2^24 runs one in-place sort of
    ``data_begin << 24 | index`` orders them by data begin (several times faster than a
    4-key lexsort); runs sharing a data begin (data shared by several devices) are then put
    in order by the other keys among themselves."""
    n = len(db)
    dense = _distinct_order(db)
    if dense is not None:
        return dense
    if n == 0 or n >= 1 << _INDEX_BITS or int(db.max()) >= 1 << (64 - _INDEX_BITS):
        order: np.ndarray = np.lexsort((tb, dv, de, db))
        return order
    key = db << np.uint64(_INDEX_BITS)
    key |= np.arange(n, dtype=U64)
    key.sort()
    order = (key & np.uint64((1 << _INDEX_BITS) - 1)).astype(np.intp)
    key >>= np.uint64(_INDEX_BITS)  # the sorted data begins
    tie = key[1:] == key[:-1]
    del key
    if bool(tie.any()):
        in_group = np.zeros(n, bool)
        in_group[1:] |= tie
        in_group[:-1] |= tie
        pos = np.flatnonzero(in_group)
        group = np.cumsum(~np.concatenate([[False], tie])[pos])  # a new group at each start
        sub = order[pos]
        order[pos] = sub[np.lexsort((tb[sub], dv[sub], de[sub], group))]
    return order


def _distinct_order(db: np.ndarray) -> np.ndarray | None:
    """The order of ``db`` without a sort when its values are distinct and span at most
    :data:`_DENSE_SPAN` times as many blocks as there are runs (each run names other data
    blocks: a pool without shared blocks, the usual answer): every run is put in the slot
    of its data begin, and the slots in use read in order. None when they are not."""
    n = len(db)
    if n < 2:
        return None
    lo = int(db.min())
    span = int(db.max()) - lo + 1
    if span > _DENSE_SPAN * n or n >= 1 << 31:
        return None
    at = (db - np.uint64(lo)).view(np.int64)
    used = np.zeros(span, bool)
    used[at] = True
    if int(np.count_nonzero(used)) != n:
        return None  # a data begin shared by several runs: sorted by all four keys
    slot = np.empty(span, np.int32)
    slot[at] = np.arange(n, dtype=np.int32)
    order: np.ndarray = slot[used].astype(np.intp)
    return order


#: :func:`_distinct_order` for data begins spread over at most this many blocks a run.
_DENSE_SPAN = 4

_TEXT_PARTS = [b"data ", b"..", b" -> thin(", b") ", b"..", b"\n"]


def rmap_chunks(r: RmapRuns) -> Iterator[bytes]:
    """The text, ``data B..E -> thin(D) V..W`` per line, a batch of lines at a time
    (rendered in bulk by dump/render.py)."""
    cols = [r.data_begin, r.data_end, r.dev_id, r.thin_begin,
            r.thin_begin + (r.data_end - r.data_begin)]
    for s in range(0, len(r), CHUNK_ROWS):
        data, _ = render_rows(_TEXT_PARTS, [c[s:s + CHUNK_ROWS] for c in cols])
        yield data.tobytes()


def rmap_text(r: RmapRuns) -> str:
    return b"".join(rmap_chunks(r)).decode("ascii")


def rmap_json(r: RmapRuns) -> str:
    """``{"runs": [{"data_begin", "data_end", "dev_id", "thin_begin", "thin_end"}, ...]}``."""
    import json  # only here: a command's start-up does not pay for it
    runs = [{"data_begin": b, "data_end": e, "dev_id": d, "thin_begin": t,
             "thin_end": t + (e - b)}
            for b, e, d, t in zip(r.data_begin.tolist(), r.data_end.tolist(),
                                  r.dev_id.tolist(), r.thin_begin.tolist(), strict=True)]
    return json.dumps({"runs": runs}) + "\n"
