"""dmimage rmap against thin_rmap 1.1: byte-identical output on the session fixtures,
generated pools, shared-leaf pools (reported for the lowest device only, as 1.1 does) and a
whole shared bottom tree; region parsing; errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dump import _alias_device, shared_xml
from test_ls import run_ours, theirs

from dmimage.errors import UsageError
from dmimage.thin.pool import open_pool
from dmimage.thin.rmap import parse_region

import damage
import oracles
import poolgen

HYP = settings(max_examples=10, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture,
                                      HealthCheck.too_slow])


def same_rmap(path, tools11, *regions: str) -> bytes:
    args = [a for r in regions for a in ("--region", r)]
    want = theirs(tools11, "thin_rmap", *args, path)
    got = run_ours("rmap", *args, path)
    assert got == want
    return got


def region_sets(nr_data: int, rng: np.random.Generator) -> list[list[str]]:
    n = max(nr_data, 3)  # four distinct cut points need n + 1 >= 4
    out = [[f"0..{n}"], ["0..1"]]
    for _ in range(3):
        cuts = sorted(rng.choice(np.arange(n + 1), 4, replace=False).tolist())
        out.append([f"{cuts[0]}..{cuts[1]}", f"{cuts[2]}..{cuts[3]}"])
    a = int(rng.integers(0, n - 1))
    out.append([f"{a}..{a + 1}", f"{a + 1}..{n}"])  # adjacent regions: runs not split
    return out


@pytest.mark.parametrize("fixture", ["empty_pool_meta", "thins3_meta", "multilevel_meta",
                                     "snapshot_meta", "overflow_meta"])
def test_fixture_pools(fixture, request, tools11):
    rp = request.getfixturevalue(fixture)
    for regions in region_sets(rp.pool.nr_data_blocks, np.random.default_rng(1)):
        same_rmap(rp.path, tools11, *regions)


@given(pool=poolgen.pools(max_devices=5, max_mappings=400, allow_big=True),
       seed=st.integers(0, 1000))
@HYP
def test_generated_pools(pool, seed, restored_pool, tools11):
    rp = restored_pool(pool)
    for regions in region_sets(pool.nr_data_blocks, np.random.default_rng(seed)):
        same_rmap(rp.path, tools11, *regions)


@given(seed=st.integers(0, 2**32 - 1), n_devices=st.integers(2, 5))
@HYP
def test_shared_leaves(seed, n_devices, tmp_path_factory, tools11):
    d = tmp_path_factory.mktemp("shared")
    meta = oracles.restore(shared_xml(seed, n_devices, 700), d / "s.meta", tools11, 2048)
    for regions in region_sets(200_000, np.random.default_rng(seed)):
        same_rmap(meta, tools11, *regions)


def test_whole_shared_tree_reported_once(restored_pool, tools11):
    big = poolgen.multilevel_pool(600, dev_id=1)
    pool = poolgen.Pool(nr_data_blocks=big.nr_data_blocks + 10,
                        devices=[big.devices[0], poolgen.Device(2), poolgen.Device(3)])
    rp = restored_pool(pool)
    _alias_device(rp.path, 1, 3)
    out = same_rmap(rp.path, tools11, f"0..{pool.nr_data_blocks}")
    assert b"thin(1)" in out and b"thin(3)" not in out


def test_json(snapshot_meta):
    doc = json.loads(run_ours("rmap", "--json", "--region", "0..100000", snapshot_meta.path))
    total = sum(r["data_end"] - r["data_begin"] for r in doc["runs"])
    pool = open_pool(snapshot_meta.path)
    assert total == sum(len(pool.mappings(i)) for i in pool.devices())


@pytest.mark.parametrize("text", ["5", "5..5", "6..5", "a..7", "1..2..3", "-1..4", "..4"])
def test_bad_regions(text):
    with pytest.raises(UsageError):
        parse_region(text)


def test_errors(tmp_path, multilevel_meta, thins3_meta, capsys):
    run_ours("rmap", "--region", "4..2", thins3_meta.path, rc=2)
    assert capsys.readouterr().err.count("\n") == 1
    meta = bytes(multilevel_meta.read())
    for i, dm in enumerate([damage.flip_byte(meta, "btree_leaf", role="bottom"),
                            damage.cycle(meta, "bottom"),
                            damage.out_of_range_pointer(meta, "bottom")]):
        p = tmp_path / f"d{i}.meta"
        p.write_bytes(bytes(dm.data))
        run_ours("rmap", "--region", "0..10", p, rc=1)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dmimage rmap: "), (dm, err)


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 3), st.integers(0, 3),
                          st.integers(0, 20)), max_size=60),
       st.booleans())
@settings(max_examples=200, deadline=None)
def test_run_order_matches_lexsort(runs, wide):
    """The packed-key sort with its tie fix orders runs as a 4-key lexsort does (runs sharing
    a data begin: data shared by devices); ``wide``: data begins past 40 bits take the
    lexsort itself."""
    from dmimage.thin.rmap import _run_order

    base = (1 << 41) if wide else 0
    db = np.array([base + r[0] for r in runs], np.uint64)
    de = db + np.array([r[1] for r in runs], np.uint64)
    dv = np.array([r[2] for r in runs], np.uint32)
    tb = np.array([r[3] for r in runs], np.uint64)
    got = _run_order(db, de, dv, tb)
    want = np.lexsort((tb, dv, de, db))
    rows = np.stack([db, de, dv.astype(np.uint64), tb], axis=1) if runs else np.empty((0, 4))
    assert np.array_equal(rows[got], rows[want])
