"""The read-only Pool against independent oracles: pools described in Python, restored by
thin_restore 0.9/1.1, then read back by dmimage and compared with the description and with an
independent space-map decoder (tests/damage.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from dmimage import open_pool
from dmimage.errors import MetadataError, UsageError

import damage
import poolgen


def assert_pool_matches(meta_path, desc: poolgen.Pool) -> None:
    with open_pool(meta_path) as pool:
        sb = pool.superblock
        assert (sb.time, sb.trans_id, sb.data_block_size, sb.nr_data_blocks) == (
            desc.time, desc.transaction, desc.data_block_size, desc.nr_data_blocks)
        devs = pool.devices()
        assert sorted(devs) == [d.dev_id for d in desc.devices]
        for d in desc.devices:
            got = devs[d.dev_id]
            assert (got.mapped_blocks, got.transaction_id, got.creation_time,
                    got.snapshotted_time) == (d.mapped_blocks, d.transaction, d.creation_time,
                                              d.snap_time)
            m = pool.mappings(d.dev_id)
            want = d.mappings
            assert np.array_equal(m.origin, want[:, 0])
            assert np.array_equal(m.data, want[:, 1])
            assert np.array_equal(m.time, want[:, 2])
        data_sm = pool.data_space_map()
        assert np.array_equal(data_sm.counts, poolgen.data_ref_counts(desc))
        raw = bytes(open(meta_path, "rb").read())
        meta_sm = pool.metadata_space_map()
        assert np.array_equal(meta_sm.counts, damage.meta_counts(raw)[: len(meta_sm.counts)])


@pytest.mark.parametrize("fixture", ["empty_pool_meta", "thins3_meta", "multilevel_meta",
                                     "snapshot_meta", "overflow_meta"])
def test_fixed_pools_read_back(request, fixture):
    rp = request.getfixturevalue(fixture)
    assert_pool_matches(rp.path, rp.pool)


def test_overflow_counts_are_read(overflow_meta):
    with open_pool(overflow_meta.path) as pool:
        counts = pool.data_space_map().counts
    assert counts.max() >= 3  # needs the overflow tree, not only the 2-bit bitmap


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(desc=poolgen.pools(max_devices=5, max_mappings=600))
def test_generated_pools_read_back_09_and_11(desc, tmp_path_factory, tools09, tools11):
    d = tmp_path_factory.mktemp("gen")
    for tools in (tools09, tools11):
        path = d / f"{tools.series}.meta"
        from oracles import nr_meta_blocks_for, restore

        restore(poolgen.to_xml(desc), path, tools,
                nr_meta_blocks_for(desc.nr_mappings, len(desc.devices), desc.nr_data_blocks))
        assert_pool_matches(path, desc)


def test_unknown_device_is_a_usage_error(thins3_meta):
    with open_pool(thins3_meta.path) as pool, pytest.raises(UsageError):
        pool.mappings(999_999)


def test_no_metadata_snapshot(thins3_meta):
    with pytest.raises(UsageError):
        open_pool(thins3_meta.path, metadata_snap=True)


def test_damaged_leaf_names_its_block(multilevel_meta, tmp_path):
    bad = damage.flip_byte(multilevel_meta.read(), "btree_leaf", role="bottom")
    p = tmp_path / "bad.meta"
    p.write_bytes(bad.data)
    with open_pool(p) as pool, pytest.raises(MetadataError) as exc:
        for dev in pool.devices():
            pool.mappings(dev)
    assert exc.value.block == bad.block
