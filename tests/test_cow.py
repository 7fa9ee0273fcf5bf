"""Copy-on-write btrees under heavy edits: thousands of mappings inserted and removed in
random order (splits, merges, redistribution, root growth and collapse), with snapshots sharing
subtrees and a held metadata snapshot, judged after every commit by dmimage check,
thin_check 1.1 and a set model of each device's mapped blocks."""

from __future__ import annotations

import numpy as np
import pytest

from dmimage.pdata.cow import OutOfSpaceError, SpaceAccount
from dmimage.thin.check import check_metadata
from dmimage.thin.pool import open_pool
from dmimage.thin.transaction import open_writable

import oracles
import poolgen

BS = 64 * 1024
NR_DATA = 40_000


def _assert_pool(meta, model: dict[int, set[int]], tools11) -> None:
    report = check_metadata(meta)
    assert report.ok(), [str(p) for p in report.problems][:5]
    rc, _, err = oracles.check(meta, tools11)
    assert rc == 0, err
    with open_pool(meta) as pool:
        assert sorted(pool.devices()) == sorted(model)
        for dev, blocks in model.items():
            m = pool.mappings(dev)
            assert m.origin.tolist() == sorted(blocks), dev
            assert pool.devices()[dev].mapped_blocks == len(blocks)


@pytest.mark.parametrize("seed", [1, 2])
def test_many_inserts_and_removes(tmp_path, tools11, seed):
    meta, data = tmp_path / "p.meta", tmp_path / "p.data"
    oracles.restore(poolgen.to_xml(poolgen.empty_pool(NR_DATA)), meta, tools11, 4096)
    with open(data, "wb") as f:
        f.truncate(NR_DATA * BS)
    rng = np.random.default_rng(seed)
    model: dict[int, set[int]] = {}
    with open_writable(meta, data) as pool:
        pool.create_thin(1)
        model[1] = set()
        for rnd in range(4):
            # grow: thousands of random virtual blocks (multi-level tree, many splits)
            for vb in rng.choice(60_000, 2500, replace=False).tolist():
                pool.write(1, vb * BS, b"\x01")
                model[1].add(vb)
            pool.commit()
            _assert_pool(meta, model, tools11)
            # a snapshot shares the whole tree; later edits on either side copy paths
            snap = 10 + rnd
            pool.create_snap(snap, 1)
            model[snap] = set(model[1])
            if rnd == 1:
                pool.reserve_metadata_snap()
            # shrink: remove most of one side in random order (merges, root collapse)
            victims = rng.permutation(sorted(model[1]))[: int(len(model[1]) * 0.8)]
            for vb in victims.tolist():
                pool.discard(1, vb * BS, BS)
                model[1].discard(vb)
            # and a few contiguous ranges from the snapshot
            start = int(rng.integers(0, 50_000))
            pool.discard(snap, start * BS, 3000 * BS)
            model[snap] = {v for v in model[snap] if not start <= v < start + 3000}
            if rnd == 2:
                pool.delete(10)
                del model[10]
                pool.release_metadata_snap()
            pool.commit()
            _assert_pool(meta, model, tools11)


def test_allocation_is_first_fit_from_a_forward_cursor():
    counts = np.zeros(10_000, np.uint32)
    counts[:5000] = 1
    counts[7000:] = 1
    acct = SpaceAccount(counts, "test map")
    assert [acct.alloc() for _ in range(2000)] == list(range(5000, 7000))
    with pytest.raises(OutOfSpaceError):
        acct.alloc()


def test_allocation_wraps_once_and_never_reuses_committed_blocks():
    acct = SpaceAccount(np.zeros(100, np.uint32), "test map")
    acct.cursor = 99
    assert [acct.alloc(), acct.alloc(), acct.alloc()] == [99, 0, 1]
    committed = SpaceAccount(np.ones(10, np.uint32), "test map")
    committed.dec(3)  # freed in this transaction: still in use on disk until commit
    with pytest.raises(OutOfSpaceError):
        committed.alloc()


def test_range_items_equals_filtered_items(tmp_path, tools11):
    """range_items reads only the nodes over a range; it must list exactly what a walk of
    the whole (multi-level, partly shadowed) tree finds there."""
    from dmimage.thin.transaction import BOTTOM

    meta, data = tmp_path / "p.meta", tmp_path / "p.data"
    oracles.restore(poolgen.to_xml(poolgen.empty_pool(NR_DATA)), meta, tools11, 4096)
    with open(data, "wb") as f:
        f.truncate(NR_DATA * BS)
    rng = np.random.default_rng(3)
    with open_writable(meta, data) as pool:
        pool.create_thin(1)
        for vb in rng.choice(60_000, 3000, replace=False).tolist():
            pool.write(1, vb * BS, b"\x01")
        pool.commit()
        pool.write(1, 30_000 * BS, b"\x02" * (700 * BS))  # dirty nodes beside clean ones
        root = pool._dev_root(1)
        everything = pool.tx.items(root, BOTTOM)
        for lo, hi in [(0, 60_000), (0, 0), (59_999, 70_000), (30_100, 30_101), *(
                sorted(rng.integers(0, 61_000, 2).tolist()) for _ in range(50))]:
            keys, values = pool.tx.range_items(root, lo, hi, BOTTOM)
            want = [(k, v) for k, v in everything if lo <= k < hi]
            assert list(zip(keys, values, strict=True)) == want, (lo, hi)
