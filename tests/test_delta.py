"""dmimage delta against thin_delta 1.1: byte-identical XML (plain and --verbose) for every
pair of devices of generated pools (snapshots: same/different runs), shared-leaf pools, the
session fixtures, --root1/--root2, -m; the vectorised diff against a per-block reference;
JSON; errors."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dump import add_held_snapshot, shared_xml
from test_ls import run_ours, theirs

from dmimage.thin.delta import KINDS, diff_mappings
from dmimage.thin.pool import open_pool

import damage
import oracles
import poolgen

HYP = settings(max_examples=10, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture,
                                      HealthCheck.too_slow])


def same_delta(path, tools11, *args) -> bytes:
    want = theirs(tools11, "thin_delta", *args, path)
    got = run_ours("delta", *args, path)
    assert got == want
    return got


def all_pairs(path, tools11, ids, limit: int = 12) -> None:
    pairs = list(itertools.product(ids, ids))[:limit]
    for a, b in pairs:
        same_delta(path, tools11, "--thin1", a, "--thin2", b)
        same_delta(path, tools11, "--verbose", "--snap1", a, "--snap2", b)


def reference(lm: dict[int, int], rm: dict[int, int]) -> list[tuple[str, int, int, int, int]]:
    """Per-block classification then runs of consecutive blocks of one class (slow, obvious)."""
    out: list[list] = []
    for v in sorted(set(lm) | set(rm)):
        if v in lm and v in rm:
            k = "same" if lm[v] == rm[v] else "different"
        else:
            k = "left_only" if v in lm else "right_only"
        if out and out[-1][0] == k and out[-1][1] + out[-1][2] == v:
            out[-1][2] += 1
        else:
            out.append([k, v, 1, lm.get(v, 0), rm.get(v, 0)])
    return [tuple(r) for r in out]


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_diff_matches_reference(data):
    def side():
        vs = data.draw(st.lists(st.integers(0, 60), unique=True, max_size=40))
        return {v: data.draw(st.integers(0, 8)) for v in sorted(vs)}

    lm, rm = side(), side()
    d = diff_mappings(np.array(list(lm), np.uint64), np.array(list(lm.values()), np.uint64),
                      np.array(list(rm), np.uint64), np.array(list(rm.values()), np.uint64))
    got = [(KINDS[k], b, n, ld, rd) for k, b, n, ld, rd in zip(
        d.kind.tolist(), d.begin.tolist(), d.length.tolist(), d.left_data.tolist(),
        d.right_data.tolist(), strict=True)]
    assert got == reference(lm, rm)


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_diff_same_blocks_matches_reference(data):
    """Both sides mapping the same virtual blocks (a snapshot and its origin): the path that
    skips the merge."""
    vs = sorted(data.draw(st.lists(st.integers(0, 60), unique=True, max_size=40)))
    lm = {v: data.draw(st.integers(0, 3)) for v in vs}
    rm = {v: data.draw(st.integers(0, 3)) for v in vs}
    keys = np.array(vs, np.uint64)
    d = diff_mappings(keys, np.array(list(lm.values()), np.uint64), keys.copy(),
                      np.array(list(rm.values()), np.uint64))
    got = [(KINDS[k], b, n, ld, rd) for k, b, n, ld, rd in zip(
        d.kind.tolist(), d.begin.tolist(), d.length.tolist(), d.left_data.tolist(),
        d.right_data.tolist(), strict=True)]
    assert got == reference(lm, rm)


@pytest.mark.parametrize("fixture", ["empty_pool_meta", "thins3_meta", "multilevel_meta",
                                     "snapshot_meta", "overflow_meta"])
def test_fixture_pools(fixture, request, tools11):
    rp = request.getfixturevalue(fixture)
    ids = [d.dev_id for d in rp.pool.devices]
    all_pairs(rp.path, tools11, ids)


@given(seed=st.integers(0, 2**32 - 1), n_devices=st.integers(2, 5))
@HYP
def test_generated_snapshot_pools(seed, n_devices, restored_pool, tools11):
    pool = poolgen.random_pool(seed, n_devices=n_devices, max_mappings=300, p_snapshot=0.7)
    rp = restored_pool(pool)
    all_pairs(rp.path, tools11, [d.dev_id for d in pool.devices], limit=25)


@given(seed=st.integers(0, 2**32 - 1), n_devices=st.integers(2, 4))
@HYP
def test_shared_leaves(seed, n_devices, tmp_path_factory, tools11):
    d = tmp_path_factory.mktemp("shared")
    meta = oracles.restore(shared_xml(seed, n_devices, 700), d / "s.meta", tools11, 2048)
    ids = [dv.dev_id for dv in open_pool(meta).devices().values()]
    all_pairs(meta, tools11, ids)


def test_roots_and_metadata_snap(tmp_path, snapshot_meta, tools11):
    meta = snapshot_meta.copy_to(tmp_path / "m.meta")
    roots = open_pool(meta).mapping_roots()
    same_delta(meta, tools11, "--root1", roots[1], "--thin2", 2)
    same_delta(meta, tools11, "--verbose", "--thin1", 3, "--root2", roots[2])
    add_held_snapshot(meta)
    same_delta(meta, tools11, "-m", "--thin1", 1, "--thin2", 3)
    same_delta(meta, tools11, "-m", "--verbose", "--thin1", 2, "--thin2", 3)


def test_json(snapshot_meta):
    doc = json.loads(run_ours("delta", "--json", "--thin1", 1, "--thin2", 2,
                              snapshot_meta.path))
    assert doc["left"] == 1 and doc["right"] == 2
    kinds = {r[0] for r in doc["runs"]}
    assert kinds <= set(KINDS) and "same" in kinds
    total = sum(r[2] for r in doc["runs"] if r[0] != "right_only")
    assert total == len(open_pool(snapshot_meta.path).mappings(1))


def test_errors(tmp_path, multilevel_meta, thins3_meta, capsys):
    run_ours("delta", "--thin1", 1, thins3_meta.path, rc=2)
    run_ours("delta", "--thin1", 1, "--thin2", 99, thins3_meta.path, rc=2)
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "--thin2" in err and "99" in err
    meta = bytes(multilevel_meta.read())
    for i, dm in enumerate([damage.flip_byte(meta, "btree_leaf", role="bottom"),
                            damage.cycle(meta, "bottom"),
                            damage.flip_byte(meta, "btree_leaf", role="top", fix_csum=True)]):
        p = tmp_path / f"d{i}.meta"
        p.write_bytes(bytes(dm.data))
        run_ours("delta", "--thin1", 1, "--thin2", 1, p, rc=1)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dmimage delta: "), (dm, err)
