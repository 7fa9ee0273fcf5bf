"""A dump written while the pool is read: memory is one batch of leaves, whatever the pool.

The whole-pool path (:func:`~dmimage.thin.dump.reader.pool_to_ir`, then the walk) holds
every mapping of the pool at once. Here the same events reach the same emitters straight from
the metadata:

1. every selected device's leaf block numbers are listed (pdata/leaves.py: strict, batched
   validation; 8 bytes a leaf is all that is kept);
2. thin_dump 1.1's sharing analysis runs on those lists (reader.py); when no leaf appears
   twice, which numpy tells at once, every device is one inline run list and no def exists;
3. defs, then devices, are emitted a batch of leaves at a time, read back from the mmap
   (already validated), merged into runs across leaf and batch boundaries alike; the
   emitter's document writes its text out every :data:`~dmimage.thin.dump.render.FLUSH_ROWS`
   rows.

The output is byte for byte what the whole-pool path writes (tests/test_dump_stream.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from dmimage.format.constants import MAPPING_VALUE_SIZE
from dmimage.format.values import unpack_mappings
from dmimage.pdata.block import BlockReader
from dmimage.pdata.leaves import gather_leaves, leaf_blocks
from dmimage.thin.dump.reader import _device_ir, shared_leaf_items, superblock_ir
from dmimage.thin.dump.walk import Emitter
from dmimage.thin.ir import Runs
from dmimage.thin.pool import Pool

if TYPE_CHECKING:
    from dmimage.progress import Progress

__all__ = ["device_leaves", "leaf_runs", "stream_dump"]

#: Leaves read back at a time while writing (dump, export): up to 16,000 mappings, whose
#: keys and values (~128 KiB each) are gathered from the leaves' columns without index
#: arrays; see render.CHUNK_ROWS for the peak RSS this gives.
STREAM_BATCH_LEAVES = 64

#: (is a ref, the def's head leaf) or (False, leaf blocks of an inline group)
Item = tuple[bool, "int | np.ndarray"]


def device_leaves(pool: Pool, ids: Sequence[int]) -> list[np.ndarray]:
    """Leaf blocks (key order) of each device's mapping tree; trees shared by several
    devices are walked once."""
    roots = pool.mapping_roots()
    by_root: dict[int, np.ndarray] = {}
    out = []
    for dev_id in ids:
        root = roots[dev_id]
        got = by_root.get(root)
        if got is None:
            # a group of sibling leaves at a time: the leaves' keys and values, gathered
            # only to be validated, are not kept beyond it
            got = by_root[root] = leaf_blocks(pool.reader, root, MAPPING_VALUE_SIZE,
                                              what=f"mapping tree of device {dev_id}",
                                              batch=1)
        out.append(got)
    return out


def share_items(lists: list[np.ndarray]) -> tuple[list[list[Item]], list[tuple[int, np.ndarray]]]:
    """thin_dump 1.1's defs and each device's items (reader.shared_leaf_items), with a fast
    answer for the common case of no leaf reached twice."""
    if lists:
        every = np.sort(np.concatenate(lists))
        if not bool((every[1:] == every[:-1]).any()):
            return [[(False, lst)] if len(lst) else [] for lst in lists], []
    per_dev, defs = shared_leaf_items([lst.tolist() for lst in lists])
    items: list[list[Item]] = [
        [(True, w) if isinstance(w, int) else (False, np.array(w, np.int64)) for _r, w in dev]
        for dev in per_dev]
    return items, [(h, np.array(seq, np.int64)) for h, seq in defs]


def _leaf_runs(keys: np.ndarray, values: np.ndarray) -> Runs:
    """``Runs.from_blocks`` of leaf entries (keys ascending, mapping values), with no copies
    when no two mappings join (a fragmented pool's every batch): the columns are the runs."""
    data, time = unpack_mappings(values)
    n = len(keys)
    if n < 2:
        return Runs.from_blocks(keys, data, time)
    one = np.uint64(1)
    join = keys[1:] == keys[:-1] + one
    join &= data[1:] == data[:-1] + one
    join &= time[1:] == time[:-1]
    if join.any():
        return Runs.from_blocks(keys, data, time)
    return Runs(keys, data, np.ones(n, np.uint64), time)


def leaf_runs(reader: BlockReader, blocks: np.ndarray, batch: int | None = None,
              progress: Progress | None = None) -> Iterator[Runs]:
    """The mapping runs of consecutive leaves (validated before), ``batch`` leaves at a time;
    a run crossing a batch boundary is held back and merged, so the runs are exactly those
    of all the leaves at once. Empty results are not yielded. ``progress`` hears of the
    leaves of each batch read."""
    batch = batch or STREAM_BATCH_LEAVES
    carry: Runs | None = None
    for s in range(0, len(blocks), batch):
        part = blocks[s:s + batch]
        lb = gather_leaves(reader, part)
        if len(part):
            reader.drop_pages(int(part.min()), int(part.max()))
        if progress is not None:
            progress(len(lb.blocks))
        if not len(lb):
            continue
        r = _leaf_runs(lb.keys, lb.values)
        if carry is not None:
            if (int(carry.origin_begin[0] + carry.length[0]) == int(r.origin_begin[0])
                    and int(carry.data_begin[0] + carry.length[0]) == int(r.data_begin[0])
                    and int(carry.time[0]) == int(r.time[0])):
                r.origin_begin[0] = carry.origin_begin[0]
                r.data_begin[0] = carry.data_begin[0]
                r.length[0] += carry.length[0]
            else:
                r = Runs.concat([carry, r])
        n = len(r)
        carry = Runs(r.origin_begin[n - 1:], r.data_begin[n - 1:], r.length[n - 1:],
                     r.time[n - 1:])
        if n > 1:
            yield Runs(r.origin_begin[:n - 1], r.data_begin[:n - 1], r.length[:n - 1],
                       r.time[:n - 1])
    if carry is not None:
        yield carry


def stream_dump(pool: Pool, out: BinaryIO, emitter: Emitter, *,
                dev_ids: Iterable[int] | None = None, skip_mappings: bool = False,
                expand: bool = False, batch: int | None = None,
                progress: Progress | None = None) -> None:
    """Write the dump of ``pool`` in ``emitter``'s format to ``out`` as it is read: the
    same text as ``write_dump(pool_to_ir(pool, ...), ...)`` (``expand``: no defs, each
    device's runs merged whole, as ``share=False`` and ``expand=True`` give). ``batch``:
    leaves read at a time (default :data:`STREAM_BATCH_LEAVES`).
    ``progress``: told the leaves to write out (once listed) and each batch written."""
    emitter.doc.sink = out
    emitter.superblock_begin(superblock_ir(pool))
    details = pool.devices()
    if skip_mappings:
        for d in details.values():
            dev = _device_ir(d)
            emitter.device_begin(dev)
            emitter.device_end(dev)
    else:
        ids = sorted(pool.mapping_roots())
        if dev_ids is not None:
            wanted = set(int(i) for i in dev_ids)
            ids = [i for i in ids if i in wanted]
        lists = device_leaves(pool, ids)
        if expand:
            per_dev: list[list[Item]] = [[(False, lst)] if len(lst) else [] for lst in lists]
            defs: list[tuple[int, np.ndarray]] = []
        else:
            per_dev, defs = share_items(lists)
        reader = pool.reader
        if progress is not None:
            progress.set_total(sum(len(seq) for _h, seq in defs) + sum(
                len(what) for items in per_dev for is_ref, what in items
                if not is_ref and isinstance(what, np.ndarray)))
        for head, seq in defs:
            emitter.def_begin(str(head))
            for r in leaf_runs(reader, seq, batch, progress):
                emitter.runs(r)
            emitter.def_end(str(head))
        for dev_id, items in zip(ids, per_dev, strict=True):
            dev = _device_ir(details[dev_id])
            emitter.device_begin(dev)
            for is_ref, what in items:
                if is_ref:
                    emitter.ref(str(what))
                else:
                    assert isinstance(what, np.ndarray)
                    for r in leaf_runs(reader, what, batch, progress):
                        emitter.runs(r)
            emitter.device_end(dev)
    emitter.superblock_end()
    emitter.doc.write_to(out)
