"""Repair: `check --auto-repair` / `--clear-needs-check-flag` (in place, crash-safe) and
`dmimage repair` / `dump --repair` (salvage into fresh metadata), with thin_check, thin_dump
and thin_repair 1.1 as oracles."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest

from dmimage.cli.main import main
from dmimage.thin.check import check_metadata
from dmimage.thin.repair import repair

import damage
import oracles
import poolgen
import semantic

BLOCK = 4096


def _write(path, data) -> str:
    with open(path, "wb") as f:
        f.write(bytes(data))
    return str(path)


def _with_needs_check(raw: bytes | bytearray) -> bytearray:
    out = bytearray(raw)
    out[4] |= 1
    damage.fix_checksum(out, 0, damage.SALT_SUPERBLOCK)
    return out


def _changed_blocks(a: bytes, b: bytes) -> list[int]:
    n = min(len(a), len(b)) // BLOCK
    av = np.frombuffer(a[: n * BLOCK], np.uint8).reshape(n, BLOCK)
    bv = np.frombuffer(b[: n * BLOCK], np.uint8).reshape(n, BLOCK)
    return np.flatnonzero((av != bv).any(axis=1)).tolist()


# ------------------------------------------------------------------ in place: auto-repair


@pytest.mark.parametrize("case", ["meta_leak", "nr_allocated_meta", "nr_allocated_data"])
def test_auto_repair_fixes_like_thin_check_11(case, thins3_meta, tools11, tmp_path, capsys):
    raw = thins3_meta.read()
    d = {"meta_leak": lambda: damage.leaked_block(raw, 1),
         "nr_allocated_meta": lambda: damage.wrong_nr_allocated(raw, "metadata"),
         "nr_allocated_data": lambda: damage.wrong_nr_allocated(raw, "data")}[case]()
    bad = _with_needs_check(d.data)
    ours = _write(tmp_path / "ours.meta", bad)
    theirs = _write(tmp_path / "theirs.meta", bad)
    assert not check_metadata(ours).ok()
    assert main(["check", "--auto-repair", ours]) == 0
    assert oracles.check(theirs, tools11, "--auto-repair")[0] == 0
    after = open(ours, "rb").read()
    # clean for both checkers, no flag left, same pool as thin_check 1.1's repair
    assert check_metadata(ours).ok()
    assert oracles.check(ours, tools11)[0] == 0
    assert oracles.dump(ours, tools11) == oracles.dump(theirs, tools11)
    assert 'flags="1"' not in oracles.dump(ours, tools11)
    # crash safety: nothing the committed state used was overwritten (block 0 aside)
    old_counts = damage.meta_counts(bytes(bad))
    used_before = damage.MetaMap(bytes(bad)).used_blocks()
    for b in _changed_blocks(bytes(bad), after):
        if b == 0:
            continue
        assert b not in used_before, f"block {b} of the committed state was overwritten"
        assert b == d.block or old_counts[b] == 0 or case != "meta_leak"
    capsys.readouterr()


def test_auto_repair_frees_a_data_leak(thins3_meta, tools11, tmp_path):
    raw = bytearray(thins3_meta.read())
    mm = damage.MetaMap(bytes(raw))
    counts = damage.data_counts(bytes(raw))
    free = int(np.flatnonzero(counts == 0)[0])
    bm = mm.data_bitmaps[free // 16320]
    e = free % 16320
    off = bm * BLOCK + 16 + 8 * (e // 32)
    word = int.from_bytes(raw[off:off + 8], "little") | (1 << (2 * (e % 32) + 1))
    raw[off:off + 8] = word.to_bytes(8, "little")
    damage.fix_checksum(raw, bm, damage.SALT_BITMAP)
    p = _write(tmp_path / "d.meta", raw)
    rep = check_metadata(p)
    assert rep.leaked_data_blocks == [free] and rep.ok(ignore_non_fatal=True)
    assert oracles.check(p, tools11)[0] != 0
    assert main(["check", "-q", "--auto-repair", p]) == 0
    assert check_metadata(p).ok() and oracles.check(p, tools11)[0] == 0
    semantic.assert_same_pool(semantic.parse_dump(oracles.dump(p, tools11)), thins3_meta.pool)


def test_auto_repair_refuses_fatal_damage(thins3_meta, tmp_path):
    d = damage.flip_byte(thins3_meta.read(), "btree_leaf")
    bad = _with_needs_check(damage.leaked_block(bytes(d.data)).data)
    p = _write(tmp_path / "f.meta", bad)
    assert main(["check", "-q", "--auto-repair", p]) == 1
    assert main(["check", "-q", "--clear-needs-check-flag", p]) == 1
    assert open(p, "rb").read() == bytes(bad)


def test_clear_needs_check_flag_rewrites_only_the_superblock(thins3_meta, tools11, tmp_path):
    bad = _with_needs_check(thins3_meta.read())
    p = _write(tmp_path / "n.meta", bad)
    assert check_metadata(p).ok()  # the flag alone is not damage
    assert main(["check", "-q", "--clear-needs-check-flag", p]) == 0
    after = open(p, "rb").read()
    assert _changed_blocks(bytes(bad), after) == [0]
    assert after == bytes(thins3_meta.read())
    theirs = _write(tmp_path / "t.meta", bad)
    assert oracles.check(theirs, tools11, "--clear-needs-check-flag")[0] == 0
    assert open(theirs, "rb").read()[:BLOCK] == after[:BLOCK]


def test_clear_needs_check_flag_leaves_leaks_unless_ignored(thins3_meta, tmp_path):
    bad = _with_needs_check(damage.leaked_block(thins3_meta.read()).data)
    p = _write(tmp_path / "l.meta", bad)
    assert main(["check", "-q", "--clear-needs-check-flag", p]) == 1
    assert open(p, "rb").read() == bytes(bad)
    assert main(["check", "-q", "--ignore-non-fatal-errors", "--clear-needs-check-flag", p]) == 0
    after = open(p, "rb").read()
    assert _changed_blocks(bytes(bad), after) == [0] and not after[4] & 1


def test_nothing_to_do_writes_nothing(thins3_meta, tmp_path):
    p = shutil.copy(thins3_meta.path, tmp_path / "c.meta")
    before = open(p, "rb").read()
    assert main(["check", "-q", "--auto-repair", "--clear-needs-check-flag", str(p)]) == 0
    assert open(p, "rb").read() == before


# ------------------------------------------------------------------ salvage: dmimage repair

def _quality():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "repair_quality.py"
    spec = importlib.util.spec_from_file_location("repair_quality", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["repair_quality"] = mod
    spec.loader.exec_module(mod)
    return mod


def _repair(inp, out, *extra, size_from=None) -> int:
    oracles.make_sparse(out, (size_from or os.path.getsize(inp)) // BLOCK)
    return main(["repair", "-q", "-i", str(inp), "-o", str(out), *extra])


@pytest.mark.parametrize("fixture", ["empty_pool_meta", "thins3_meta", "multilevel_meta",
                                     "snapshot_meta", "overflow_meta"])
def test_repair_of_a_healthy_pool_is_the_same_pool(request, fixture, tools11, tmp_path):
    rp = request.getfixturevalue(fixture)
    before = rp.read()
    out = tmp_path / "out.meta"
    assert _repair(rp.path, out) == 0
    assert rp.read() == before
    assert check_metadata(out).ok() and oracles.check(out, tools11)[0] == 0
    # shared leaves stay shared: thin_dump sees the same defs and refs
    assert oracles.dump(out, tools11) == oracles.dump(rp.path, tools11)


def test_repair_never_writes_its_input(thins3_meta, tmp_path):
    src = tmp_path / "in.meta"
    shutil.copy(thins3_meta.path, src)
    os.chmod(src, 0o444)
    d = damage.flip_byte(src.read_bytes(), "btree_leaf")
    os.chmod(src, 0o644)
    src.write_bytes(d.data)
    os.chmod(src, 0o444)
    assert _repair(src, tmp_path / "out.meta") == 0
    assert src.read_bytes() == bytes(d.data)
    assert main(["repair", "-q", "-i", str(src), "-o", str(src)]) == 2


def test_lost_superblock_needs_the_data_block_size(thins3_meta, tools11, tmp_path, capsys):
    raw = thins3_meta.read()
    raw[:BLOCK] = bytes(BLOCK)
    bad = _write(tmp_path / "z.meta", raw)
    out = tmp_path / "o.meta"
    assert _repair(bad, out) == 2
    assert "--data-block-size" in capsys.readouterr().err
    assert _repair(bad, out, "--data-block-size", "128", "--transaction-id", "50",
                   "--nr-data-blocks", "5000") == 0
    got = semantic.parse_dump(oracles.dump(out, tools11))
    assert got.transaction == 50 and got.nr_data_blocks == 5000
    semantic.assert_same_pool(got, thins3_meta.pool,
                              ignore=("transaction", "nr_data_blocks", "time"))
    assert oracles.check(out, tools11)[0] == 0


def test_scan_of_a_sparse_input_finds_what_a_dense_copy_has(multilevel_meta, tmp_path,
                                                           capsys):
    """With the superblock lost, roots come from a scan for node headers, which reads only
    a regular file's data extents: the same input written with holes (the lost superblock's
    block before its nodes, the unused blocks after them) and written out whole salvages to
    the same pool, and a file of zeros salvages nothing."""
    import sparse

    raw = multilevel_meta.read()
    raw[:BLOCK] = bytes(BLOCK)
    holes = str(tmp_path / "holes.meta")
    sparse.write_sparse(holes, raw)
    extents = list(_data_extents(holes))
    assert extents and extents[0][0] > 0 and extents[-1][1] < len(raw)
    dense = _write(tmp_path / "dense.meta", raw)
    dumps = []
    for path in (holes, dense):
        assert main(["dump", "--repair", "--data-block-size", "128", path]) == 0
        dumps.append(capsys.readouterr().out)
    assert dumps[0] == dumps[1] and "<device" in dumps[0]
    empty = tmp_path / "empty.meta"
    empty.write_bytes(b"")
    os.truncate(empty, len(raw))
    assert main(["dump", "--repair", "--data-block-size", "128", str(empty)]) == 1
    assert "nothing to salvage" in capsys.readouterr().err


def _data_extents(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        pos, size = 0, os.fstat(fd).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                return
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, pos
    finally:
        os.close(fd)


def test_dump_repair_matches_the_repaired_pool(multilevel_meta, tools11, tmp_path, capsys):
    d = damage.flip_byte(multilevel_meta.read(), "btree_leaf", role="bottom")
    bad = _write(tmp_path / "b.meta", d.data)
    assert main(["dump", bad]) != 0
    capsys.readouterr()
    assert main(["dump", "--repair", bad]) == 0
    ours = capsys.readouterr().out
    out = tmp_path / "o.meta"
    assert _repair(bad, out) == 0
    assert ours.rstrip("\n") == oracles.dump(out, tools11).rstrip("\n")
    assert main(["dump", "--repair", "-f", "json", bad]) == 0
    assert '"dmimage-thin-dump"' in capsys.readouterr().out


@pytest.mark.parametrize("pool_name", ["thins3", "multilevel", "snapshots"])
def test_repair_quality_at_least_thin_repair_11(pool_name, tools11, tmp_path):
    q = _quality()
    (case,) = q.generated_cases(tmp_path, tools11, [pool_name])
    rows = q.evaluate(case, tmp_path, tools11, in_process=True)
    assert len(rows) >= 10
    bad = []
    for r in rows:  # on these pools dmimage returns no wrong mapping at all
        if not r.ours.ok or r.ours.wrong or r.ours.correct < r.theirs.correct:
            bad.append(f"{r.damage}: ours {r.ours}, thin_repair 1.1 {r.theirs}")
    assert not bad, "\n".join(bad)


def test_device_missing_from_the_details_tree_gets_regenerated_details(multilevel_meta,
                                                                       tools11, tmp_path):
    """Found by the fuzzer: the details leaf's key 1 rewritten to 300 (checksum fixed)."""
    import fuzz_damage

    raw = multilevel_meta.read()
    details_leaf = damage.MetaMap(bytes(raw)).details_root
    used = fuzz_damage.used_blocks(bytes(raw))
    bad = fuzz_damage.apply(bytes(raw), [("field", used.index(details_leaf), "key0", 300)], used)
    src = _write(tmp_path / "k.meta", bad)
    out = tmp_path / "o.meta"
    assert _repair(src, out) == 0
    assert oracles.check(out, tools11)[0] == 0
    got = semantic.parse_dump(oracles.dump(out, tools11))
    assert [d.dev_id for d in got.devices] == [1]
    assert len(got.devices[0].mappings) == multilevel_meta.pool.nr_mappings


def test_garbage_data_block_does_not_inflate_the_data_device(tmp_path, tools11):
    """One mapping whose data block was damaged into a huge number (checksum fixed): repair
    must not size the data device from it (that would need more metadata than exists); the
    mapping is dropped and the rest kept."""
    pool = poolgen.multilevel_pool(1500)
    meta = tmp_path / "m.meta"
    oracles.restore(poolgen.to_xml(pool), meta, tools11, 512)
    raw = bytearray(meta.read_bytes())
    mm = damage.MetaMap(bytes(raw))
    leaf = next(n for n in mm.nodes_where("bottom") if not n.internal)
    voff = leaf.block * 4096 + 32 + 8 * leaf.max_entries
    raw[voff : voff + 8] = ((1 << 39) << 24).to_bytes(8, "little")
    damage.fix_checksum(raw, leaf.block, damage.SALT_BTREE)
    bad = tmp_path / "bad.meta"
    bad.write_bytes(raw)
    out = oracles.make_sparse(tmp_path / "out.meta", 512)
    res = repair(bad, out)
    assert res.report.nr_mappings == 1499
    assert check_metadata(out).ok()
    assert oracles.check(out, tools11)[0] == 0


# ------------------------------------------------------------------ lost top-level tree


def test_newest_first_follows_the_allocator_around_the_wrap():
    from dmimage.thin.repair_roots import newest_first

    # a cursor moving forward: the highest block is the newest
    assert newest_first([5, 9, 7], 100) == [9, 7, 5]
    # it wrapped: 90 and 95 were written before 2 and 4 (the widest gap, 4 -> 90, is where
    # the cursor has not been lately)
    assert newest_first([90, 2, 95, 4], 100) == [4, 2, 95, 90]
    assert newest_first([3], 100) == [3]


def _tree(keys, blocks, times, root=1):
    from dmimage.thin.repair_roots import Tree

    k = np.array(keys, np.uint64)
    return Tree(root, k, np.array(blocks, np.int64), np.array(times, np.int64),
                bytes(str((keys, blocks, times)), "ascii"))


def test_a_newer_version_of_a_tree_maps_every_shared_key_no_earlier():
    from dmimage.thin.repair_roots import _newer

    old = _tree([0, 1, 2], [10, 11, 12], [0, 0, 0])
    cow = _tree([0, 1, 2], [10, 40, 12], [0, 3, 0])  # block 1 copied on write at time 3
    assert _newer(cow, old) and not _newer(old, cow)
    mixed = _tree([0, 1, 2], [50, 11, 12], [5, 0, 0])
    assert not _newer(mixed, cow) or not _newer(cow, mixed)
    assert not _newer(cow, mixed) and not _newer(mixed, cow)  # neither is the other's past
    other = _tree([7, 8, 9], [1, 2, 3], [9, 9, 9])  # no key in common: not versions
    assert not _newer(other, old)


def test_lost_top_level_tree_with_equal_counts_and_no_witness_is_left_out(thins3_meta, tmp_path,
                                                                          capsys):
    """Three devices of 20 mappings each and no stale top-level tree: no pairing is safe, so
    the devices are left out, and the output says why."""
    raw = thins3_meta.read()
    mm = damage.MetaMap(bytes(raw))
    raw[mm.mapping_root * BLOCK:(mm.mapping_root + 1) * BLOCK] = bytes(BLOCK)
    bad = _write(tmp_path / "t.meta", raw)
    assert main(["dump", "--repair", bad]) == 0
    err = capsys.readouterr().err
    assert "top-level mapping tree rebuilt" in err
    for dev in (1, 2, 3):
        assert f"device {dev}: left out (ambiguous: " in err
    assert "ambiguous: several trees fit devices [1, 2, 3]" in err
    assert "salvaged 0 devices, 0 mappings" in err
