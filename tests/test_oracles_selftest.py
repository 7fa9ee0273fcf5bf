"""Self-tests of the oracle infrastructure (oracles, poolgen, semantic, damage, conftest).

They prove that what the reader/writer tests will lean on is right:
* XML rendered by poolgen restores with both thin_restore versions and passes both thin_checks;
* thin_dump (XML and human_readable) of both versions parses back to the description;
* the data ref counts poolgen predicts are what thin_restore writes;
* every damage function yields metadata the checkers treat as recorded below
  (thin-format.md §13, plus our own observations).
"""

from __future__ import annotations

import dataclasses
import os

import crc32c
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import damage as dm
import oracles
import poolgen as pg
import semantic as sem

FIXED_POOLS = {
    "empty": pg.empty_pool,
    "thins3": lambda: pg.thins_pool(3),
    "multilevel": lambda: pg.multilevel_pool(5000),
    "snapshot": pg.snapshot_pool,
    "overflow": lambda: pg.overflow_pool(5),
    "random": lambda: pg.random_pool(7, n_devices=5, max_mappings=400, p_snapshot=0.6),
    "needs_check": lambda: pg.Pool(
        time=3,
        transaction=9,
        flags=1,
        nr_data_blocks=100,
        devices=[pg.Device(5, [(0, 1, 0), (1, 2, 0), (7, 99, 3)], creation_time=0, snap_time=3)],
    ),
    "big_dbs": lambda: pg.random_pool(11, n_devices=2, data_block_size=2_097_152),
}


def _restored_view(pool: pg.Pool, series: str) -> pg.Pool:
    """What thin_restore of *series* writes: 1.1 ignores the XML's flags (NEEDS_CHECK is lost)."""
    return dataclasses.replace(pool, flags=0) if series == "1.1" else pool


def _tools(request, series):
    return request.getfixturevalue({"1.1": "tools11", "0.9": "tools09"}[series])


# ----------------------------------------------------------------------------- pure


def test_crc_vectors():
    assert crc32c.crc32c(b"123456789") == 0xE3069283
    zero = bytes(4096)
    assert dm.checksum(zero, dm.SALT_SUPERBLOCK) == 0x58CFD397
    assert dm.checksum(zero, dm.SALT_BTREE) == 0x58CC7E82
    assert dm.checksum(zero, dm.SALT_BITMAP) == 0x58CE0B1A
    assert dm.checksum(zero, dm.SALT_INDEX) == 0x58CFD54F


def test_runs_and_xml_shape():
    p = pg.Pool(
        time=2,
        transaction=1,
        nr_data_blocks=100,
        devices=[pg.Device(3, [(0, 10, 0), (1, 11, 0), (2, 12, 1), (5, 13, 1), (6, 14, 1)])],
    )
    r = pg.runs(p.devices[0].mappings).tolist()
    assert r == [[0, 10, 2, 0], [2, 12, 1, 1], [5, 13, 2, 1]]
    x09, x11 = pg.to_xml(p, "0.9"), pg.to_xml(p, "1.1")
    assert 'flags="0"' in x09 and "flags" not in x11
    assert '<single_mapping origin_block="2" data_block="12" time="1"/>' in x09
    for x in (x09, x11):
        assert sem.same_pool(p, sem.parse_xml(x))


def test_same_pool_message():
    a, b = pg.thins_pool(3), pg.thins_pool(3)
    assert sem.same_pool(a, b)
    b.time += 1
    b.devices[1].mappings[2, 1] += 1000
    b.devices[2].snap_time = 77
    r = sem.same_pool(a, b)
    assert not r
    msg = str(r)
    assert "superblock time" in msg and "device 2: origin" in msg and "device 3 snap_time" in msg
    with pytest.raises(AssertionError):
        sem.assert_same_pool(a, b)
    assert sem.same_pool(a, b, ignore=("time", "snap_time")) is not None


def test_fragmented_pool_is_all_singles_and_deterministic():
    a = pg.fragmented_pool(3, 2000, seed=5)
    b = pg.fragmented_pool(3, 2000, seed=5)
    assert sem.same_pool(a, b)
    for d in a.devices:
        assert len(pg.runs(d.mappings)) == 2000
    all_data = np.concatenate([d.mappings[:, 1] for d in a.devices])
    assert len(np.unique(all_data)) == len(all_data) and all_data.max() < a.nr_data_blocks
    assert "range_mapping" not in pg.to_xml(a)


def test_human_readable_parsers():
    h11 = (
        'begin superblock: "", 1, 2, 0, 2, 128, 2000\ndef: 1\n    (0..1) -> (10..11), 0\n\n'
        "device: 4\nmapped_blocks: 3\ntransaction: 0\ncreation time: 0\nsnap time: 1\n"
        "    ref: 1\n    (5..5) -> (20..20), 1\n\nend superblock\n"
    )
    h09 = (
        'begin superblock: "", 1, 2, 0, 1, 128, 2000\ndevice: 4\nmapped_blocks: 3\n'
        "transaction: 0\ncreation time: 0\nsnap time: 1\n    (0..1) -> (10..11), 0\n"
        "    5 -> 20, 1\n\nend superblock\n"
    )
    a, b = sem.parse_human(h11), sem.parse_human(h09)
    assert a.version == 2 and b.version == 1
    assert sem.same_pool(a, b, ignore=("version",))
    assert a.devices[0].mapping_list() == [(0, 10, 0), (1, 11, 0), (5, 20, 1)]


# ----------------------------------------------------------------------------- tools


def test_tool_versions(tools09, tools11):
    assert tools09.version.startswith("0.9.") and tools11.version.startswith("1.1.")
    for t in (tools09, tools11):
        for name in (
            "thin_check",
            "thin_dump",
            "thin_restore",
            "thin_repair",
            "thin_ls",
            "thin_delta",
            "thin_rmap",
            "thin_metadata_size",
        ):
            assert t.has(name), (t, name)
    assert tools11.has("thin_metadata_pack") and not tools09.has("thin_metadata_pack")
    assert (
        oracles.metadata_size(tools11, "-b", "64k", "-s", "1t", "-m", "100").split()[0] == "1066032"
    )
    assert "1066024" in oracles.metadata_size(tools09, "-b", "64k", "-s", "1t", "-m", "100")


def test_nosleep_shim_changes_no_verdict(tmp_path, tools11, multilevel_meta):
    """The shim oracles.py preloads into the 1.1 tools (their half-second exit) caps sleeps,
    and nothing else: thin_check 1.1's exit status, stdout and stderr are the same with and
    without it, on a clean pool and on damaged ones."""
    import shutil
    import subprocess
    import time

    if os.environ.get("DMIMAGE_ORACLE_SLEEP") == "1":
        pytest.skip("DMIMAGE_ORACLE_SLEEP=1: the shim is off")
    assert shutil.which("cc") is None or oracles.nosleep_shim() is not None, \
        "a C compiler is here but the shim was not built"
    env = oracles.tool_env(tools11)
    if env is None:
        pytest.skip("no C compiler: the 1.1 tools run unchanged")
    t0 = time.monotonic()
    assert subprocess.run(["sleep", "3"], env=env).returncode == 0
    assert time.monotonic() - t0 < 2.5, "the shim does not shorten a sleep"
    raw = multilevel_meta.read()
    files = {"clean": multilevel_meta.path}
    for d in (dm.flip_byte(raw, "btree_leaf", role="bottom"), dm.leaked_block(raw, 1),
              dm.flip_byte(raw, "bitmap", role="data")):
        files[d.kind] = tmp_path / f"{d.kind}.meta"
        files[d.kind].write_bytes(d.data)
    rcs = set()
    for name, path in files.items():
        for args in ((), ("-q",)):
            argv = [str(tools11.thin_check), *args, str(path)]
            plain = subprocess.run(argv, capture_output=True, text=True)
            shimmed = subprocess.run(argv, capture_output=True, text=True, env=env)
            assert (shimmed.returncode, shimmed.stdout, shimmed.stderr) == (
                plain.returncode, plain.stdout, plain.stderr), (name, args)
            rcs.add(plain.returncode)
    assert rcs == {0, tools11.fail_rc}


@pytest.mark.parametrize("restorer", ["1.1", "0.9"])
@pytest.mark.parametrize("name", list(FIXED_POOLS))
def test_restore_check_dump_roundtrip(request, tmp_path, tools09, tools11, name, restorer):
    pool = FIXED_POOLS[name]()
    pool.validate()
    meta = oracles.restore(
        pg.to_xml(pool, "1.1" if restorer == "1.1" else "0.9"),
        tmp_path / "m",
        _tools(request, restorer),
        oracles.nr_meta_blocks_for(pool.nr_mappings, len(pool.devices), pool.nr_data_blocks),
    )
    for t in (tools11, tools09):
        rc, out, err = oracles.check(meta, t)
        assert rc == 0, f"{t}: {err}"
        assert f"TRANSACTION_ID={pool.transaction}" in out
        for args in ((), ("--format", "human_readable")):
            got = sem.parse_dump(oracles.dump(meta, t, *args))
            sem.assert_same_pool(_restored_view(pool, restorer), got)
            assert got.version == 2  # we render version="2"
    if restorer == "1.1":
        assert (dm.data_counts(meta.read_bytes()) == pg.data_ref_counts(pool)).all()


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(pool=pg.pools(max_devices=5, max_mappings=300, allow_big=True))
def test_generated_pools_roundtrip(tmp_path_factory, tools11, tools09, pool):
    d = tmp_path_factory.mktemp("hyp")
    meta = oracles.restore(
        pg.to_xml(pool),
        d / "m",
        tools11,
        oracles.nr_meta_blocks_for(pool.nr_mappings, len(pool.devices), pool.nr_data_blocks),
    )
    for t in (tools11, tools09):
        rc, _, err = oracles.check(meta, t)
        assert rc == 0, err
    sem.assert_same_pool(_restored_view(pool, "1.1"), sem.parse_xml(oracles.dump(meta, tools11)))
    assert (dm.data_counts(meta.read_bytes()) == pg.data_ref_counts(pool)).all()


def test_superblock_version_written(tmp_path, tools11, tools09):
    """thin_restore 0.9 writes the XML's version attribute (1 if absent); 1.1 always writes 2.
    thin_dump of both versions reports the on-disk value."""
    xml = pg.to_xml(pg.thins_pool(1)).replace(' version="2"', "")
    for t, want in ((tools09, 1), (tools11, 2)):
        meta = oracles.restore(xml, tmp_path / f"m{t.series}", t)
        assert int.from_bytes(meta.read_bytes()[40:44], "little") == want
        for d in (tools09, tools11):
            assert sem.parse_xml(oracles.dump(meta, d)).version == want
            assert oracles.check(meta, d)[0] == 0


def test_needs_check_flag(tmp_path, tools11, tools09):
    """thin_restore 1.1 drops flags="1"; 0.9 keeps it.  Both checkers pass with the flag set."""
    p = FIXED_POOLS["needs_check"]()
    for t, want in ((tools11, 0), (tools09, 1)):
        meta = oracles.restore(pg.to_xml(p), tmp_path / f"m{t.series}", t)
        assert int.from_bytes(meta.read_bytes()[4:8], "little") == want
        for c in (tools11, tools09):
            assert oracles.check(meta, c)[0] == 0
            assert sem.parse_xml(oracles.dump(meta, c)).flags == want


def test_def_ref_dump_expands(tmp_path, tools11, tools09):
    """1.1's restore accepts <def>/<ref>; its dump of shared leaves uses <def>/<ref> again;
    0.9's restore rejects <def> ('unknown tag type'), its dump expands shared leaves."""
    shared = [(i, (i * 7) % 1000, 0) for i in range(300)]
    lines = [
        '<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="2000">',
        '  <def name="s">',
    ]
    lines += [
        f'    <single_mapping origin_block="{o}" data_block="{d}" time="{t}"/>'
        for o, d, t in shared
    ]
    lines.append("  </def>")
    devs = []
    for dev in (1, 2):
        lines.append(
            f'  <device dev_id="{dev}" mapped_blocks="301" transaction="0" '
            'creation_time="0" snap_time="1">'
        )
        lines += [
            '    <ref name="s"/>',
            f'    <single_mapping origin_block="500" data_block="{1500 + dev}" time="1"/>',
            "  </device>",
        ]
        devs.append(pg.Device(dev, shared + [(500, 1500 + dev, 1)], creation_time=0, snap_time=1))
    lines.append("</superblock>")
    xml = "\n".join(lines) + "\n"
    expect = pg.Pool(time=1, transaction=2, nr_data_blocks=2000, devices=devs)
    assert sem.same_pool(expect, sem.parse_xml(xml))
    meta = oracles.restore(xml, tmp_path / "m", tools11)
    for t in (tools11, tools09):
        assert oracles.check(meta, t)[0] == 0
    d11 = oracles.dump(meta, tools11)
    assert "<def " in d11 and "<ref " in d11
    assert sem.same_pool(sem._parse_xml_etree(d11), sem._parse_xml_fast(d11))
    for t in (tools11, tools09):
        for args in ((), ("--format", "human_readable")):
            sem.assert_same_pool(expect, sem.parse_dump(oracles.dump(meta, t, *args)))
    with pytest.raises(oracles.ToolError):
        oracles.restore(xml, tmp_path / "m09", tools09)


def test_session_fixtures(
    tools11, tools09, empty_pool_meta, thins3_meta, multilevel_meta, snapshot_meta, overflow_meta
):
    for rp in (empty_pool_meta, thins3_meta, multilevel_meta, snapshot_meta, overflow_meta):
        for t in (tools11, tools09):
            assert oracles.check(rp.path, t)[0] == 0
        sem.assert_same_pool(rp.pool, sem.parse_xml(oracles.dump(rp.path, tools11)))
    mm = dm.MetaMap(multilevel_meta.read())
    assert mm.nodes_where("bottom", internal=True), "multilevel pool must have an internal node"
    assert pg.data_ref_counts(overflow_meta.pool).max() >= 3
    counts = dm.data_counts(overflow_meta.read())
    assert counts.max() >= 3 and (counts == pg.data_ref_counts(overflow_meta.pool)).all()
    assert pg.data_ref_counts(snapshot_meta.pool).max() >= 2


def test_restored_pool_factory(restored_pool, tools09):
    rp = restored_pool(pg.thins_pool(2), tools="0.9")
    assert rp.tools.series == "0.9" and rp.path.stat().st_size == rp.nr_meta_blocks * 4096
    assert oracles.check(rp.path, tools09)[0] == 0


# ----------------------------------------------------------------------------- damage

# kind -> (rejected by 1.1, rejected by 0.9), observed with 1.1.0 and 0.9.0
EXPECTED = {
    "flip:superblock:nofix": (True, True),
    "flip:superblock:fix": (True, True),
    "blocknr:superblock": (False, False),  # §13: tools don't check sb blocknr (kernel does)
    "flip:btree_internal:nofix": (True, True),
    "flip:btree_internal:fix": (True, True),
    "blocknr:btree_internal": (True, True),
    "flip:btree_leaf:nofix": (True, True),
    "flip:btree_leaf:fix": (True, True),
    "blocknr:btree_leaf": (True, True),
    "blocknr:btree_leaf:top": (True, True),
    "flip:btree_leaf:details:fix": (True, True),
    "flip:index:nofix": (True, True),
    "flip:index:fix": (True, True),
    "blocknr:index": (True, True),
    "flip:bitmap:data:nofix": (True, True),
    "flip:bitmap:data:fix": (True, False),  # §13: 0.9 does not check data counts
    "blocknr:bitmap:data": (False, True),  # observed: 1.1.0 ignores bitmap blocknr
    "flip:bitmap:meta:nofix": (True, True),
    "flip:bitmap:meta:fix": (True, True),
    "blocknr:bitmap:meta": (False, True),  # observed: 1.1.0 ignores bitmap blocknr
    "nr_allocated:metadata": (False, False),  # §13: not checked
    "nr_allocated:data": (False, False),
    "leak:1": (True, True),
    "leak:2": (True, True),
    "missing_ref:bottom": (True, True),
    "cycle:bottom:nearest": (True, True),
    "cycle:bottom:top": (True, True),
    "oob:bottom": (True, True),
    "oob:top": (True, True),
    "truncate": (True, True),
}


@pytest.fixture(scope="module")
def damage_cases(multilevel_meta):
    return {d.kind: d for d in dm.all_damage(multilevel_meta.read())}


def test_all_damage_kinds_present(damage_cases):
    assert set(damage_cases) == set(EXPECTED)


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_damage_vs_thin_check(tmp_path, tools11, tools09, damage_cases, kind):
    d = damage_cases[kind]
    path = tmp_path / "d.meta"
    path.write_bytes(d.data)
    for t, rejected in zip((tools11, tools09), EXPECTED[kind], strict=True):
        rc, out, err = oracles.check(path, t, timeout=60)
        want = t.fail_rc if rejected else 0
        assert rc == want, f"{t} on {d.description}: rc {rc}, want {want}\n{err[-1500:]}"


def test_leak_is_repairable(tmp_path, tools11, tools09, multilevel_meta):
    path = tmp_path / "leak.meta"
    path.write_bytes(dm.leaked_block(multilevel_meta.read()).data)
    assert oracles.check(path, tools11, "--ignore-non-fatal-errors")[0] == 0
    assert oracles.check(path, tools09, "--ignore-non-fatal-errors")[0] == 0
    assert oracles.check(path, tools11, "--auto-repair")[0] == 0
    for t in (tools11, tools09):
        assert oracles.check(path, t)[0] == 0


def test_block_type_scan(multilevel_meta):
    meta = multilevel_meta.read()
    types = dm.scan(meta)
    mm = dm.MetaMap(meta)
    assert types[0] == "superblock" and types[mm.meta_index] == "index"
    for b in mm.bitmaps:
        assert types[b] == "bitmap"
    for n in mm.nodes.values():
        assert types[n.block] == ("btree_internal" if n.internal else "btree_leaf")
    assert set(types) == mm.used_blocks()
    counts = dm.meta_counts(meta)
    assert set(np.flatnonzero(counts).tolist()) == mm.used_blocks()
