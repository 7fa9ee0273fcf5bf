"""Incremental space-map commits (pdata/sm_update.py): a WritablePool commit rewrites only the
bitmaps, index entries and overflow (ref-count >= 3) entries whose counts changed.

The pool spans several bitmaps of both maps: 60,000 data blocks (4 data bitmaps, mappings
spread over all of them) and a 40,000-block metadata device whose first transaction creates
17,000 thins, so metadata blocks are in use in two metadata bitmaps. Random transactions then
write, snapshot (counts cross 3 in both maps, and drop back), discard, delete and hold/release
a metadata snapshot; after every commit thin_check 1.1, thin_check 0.9 and ``dmimage check``
must all pass (each recounts every reference and compares it with the stored maps), and
bitmaps that no change touched must still be the committed blocks.
"""

from __future__ import annotations

import random
import subprocess

import numpy as np
import pytest

from dmimage import open_pool
from dmimage.format.constants import ENTRIES_PER_BITMAP
from dmimage.thin.check import check_metadata
from dmimage.thin.transaction import open_writable

import oracles
import poolgen

BS = 128 * 512
NR_DATA = 60_000
META_BLOCKS = 40_000
SEED = 11


def _maps(meta):
    with open_pool(meta) as pool:
        return pool.data_space_map(), pool.metadata_space_map()




def _all_check(meta, tools09, tools11) -> None:
    # the three checks side by side (each reads the whole 17,000-thin pool)
    procs = [(tools, subprocess.Popen([str(tools.thin_check), str(meta)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True,
                                      env=oracles.tool_env(tools)))
             for tools in (tools11, tools09)]
    try:
        report = check_metadata(meta)
    finally:
        results = [(tools, p.communicate(timeout=600), p.returncode) for tools, p in procs]
    problems = [str(p) for p in report.problems]
    assert not problems, problems
    for tools, (out, err), rc in results:
        assert rc == 0, (tools, out, err)


@pytest.fixture
def spread_pool(shm_path, tools11):
    """On tmpfs (conftest's shm_path): three checkers read its ~70 MB nine times."""
    pool = poolgen.fragmented_pool(n_thins=3, n_mappings=3000, seed=SEED,
                                   nr_data_blocks=NR_DATA)
    meta = oracles.restore(poolgen.to_xml(pool), shm_path / "pool.meta", tools11, META_BLOCKS)
    data = shm_path / "pool.data"
    with open(data, "wb") as f:
        f.truncate(NR_DATA * BS)
    return meta, data


def test_random_transactions_pass_both_thin_checks(spread_pool, tools09, tools11):
    meta, data = spread_pool
    rng = random.Random(SEED)
    with open_writable(meta, data) as p:
        for dev in range(100, 17_100):
            p.create_thin(dev)
        p.commit()
    _all_check(meta, tools09, tools11)
    dmap, mmap = _maps(meta)
    assert np.count_nonzero(mmap.counts[ENTRIES_PER_BITMAP:]) > 0, "only one metadata bitmap used"
    assert len(np.unique(np.flatnonzero(dmap.counts) // ENTRIES_PER_BITMAP)) == 4
    saw_meta_overflow = saw_data_overflow = False
    for _step in range(8):
        with open_writable(meta, data) as p:
            devs = sorted(p.details)
            for _ in range(rng.randrange(1, 40)):
                op = rng.random()
                busy = [d for d in devs if d < 100 or d >= 17_100]  # the restored thins, snaps
                dev = rng.choice(busy if rng.random() < 0.8 else devs)
                if op < 0.5:
                    p.write(dev, rng.randrange(3000) * BS + rng.randrange(BS - 512), b"x" * 512)
                elif op < 0.65:
                    new = max(p.details) + 1
                    p.create_snap(new, dev)
                    devs.append(new)
                elif op < 0.8:
                    first = rng.randrange(3000)
                    p.discard(dev, first * BS, rng.randrange(1, 200) * BS)
                elif op < 0.9 and len(devs) > 4:
                    p.delete(dev)
                    devs.remove(dev)
                elif p.held_root:
                    p.release_metadata_snap()
                else:
                    p.reserve_metadata_snap()
            saw_data_overflow |= bool((p.tx.data.counts >= 3).any())
            saw_meta_overflow |= bool((p.tx.meta.counts >= 3).any())
            assert p._incremental_space_maps()
            p.commit()
        _all_check(meta, tools09, tools11)
    assert saw_data_overflow and saw_meta_overflow, "no count reached the overflow tree"


def test_commit_rewrites_only_the_bitmaps_it_changed(spread_pool, tools09, tools11):
    """One single-block write into a fresh data block: the other data bitmaps and the
    untouched metadata bitmaps keep their blocks; few blocks are written in all."""
    meta, data = spread_pool
    dmap0, mmap0 = _maps(meta)
    written: list[int] = []
    with open_writable(meta, data) as p:
        p.write(0, 5000 * BS, b"y" * BS)  # beyond thin 0's 3000 mapped blocks: provisions
        new_block = p.lookup(0, 5000)[0]
        p.commit(write_block=lambda b, buf: (written.append(b), p._pwrite_block(b, buf)),
                 flush=p._fsync)
    _all_check(meta, tools09, tools11)
    dmap1, mmap1 = _maps(meta)
    changed_bm = new_block // ENTRIES_PER_BITMAP
    for bm in range(len(dmap0.index)):
        same = dmap0.index[bm]["blocknr"] == dmap1.index[bm]["blocknr"]
        assert same == (bm != changed_bm), bm
    assert dmap1.counts[new_block] == 1 and dmap0.counts[new_block] == 0
    # metadata: 3 bitmaps, all changes near the start: bitmaps 1 and 2 stay put
    assert len(mmap0.index) == 3
    assert (mmap1.index["blocknr"][1:] == mmap0.index["blocknr"][1:]).all()
    # a leaf path, the top-level path, details, one data bitmap with its index path, one
    # metadata bitmap, the index block, the superblock: nowhere near the 7 bitmaps + trees
    assert len(written) <= 16, written


def test_overflow_entries_follow_counts_both_ways(spread_pool, tools09, tools11):
    """Snapshots push counts to >= 3 (overflow entries inserted), deleting them brings the
    counts back (entries removed); each state passes both thin_checks."""
    meta, data = spread_pool
    with open_writable(meta, data) as p:
        for snap in (10, 11, 12):
            p.create_snap(snap, 0)
        p.commit()
    dmap, mmap = _maps(meta)
    assert mmap.counts.max() >= 3
    _all_check(meta, tools09, tools11)
    with open_writable(meta, data) as p:
        for snap in (10, 11):  # each copies the shared leaf: its data blocks reach 3
            p.write(snap, 7 * BS, b"z" * BS)
        p.commit()
    dmap, mmap = _maps(meta)
    assert dmap.counts.max() >= 3
    _all_check(meta, tools09, tools11)
    with open_writable(meta, data) as p:
        for snap in (10, 11, 12):
            p.delete(snap)
        p.commit()
    dmap, mmap = _maps(meta)
    assert dmap.counts.max() == 1 and mmap.counts.max() < 3
    _all_check(meta, tools09, tools11)
