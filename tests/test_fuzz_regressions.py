"""What the fuzzer (tests/test_fuzz.py) found, pinned as fixed inputs.

Each test rebuilds the input the fuzzer reported (a thin_restore 1.1 pool of 512 metadata
blocks, damaged as the recipe said, written out here as the one field it changes) and checks
the fixed behaviour, with thin_check 1.1 as the oracle where a verdict is involved.
"""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from dmimage.cli.main import main
from dmimage.format.constants import MAPPING_VALUE_SIZE
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import BtreeWalker
from dmimage.thin.check import check_metadata

import damage
import fuzz_judge
import fuzz_run
import oracles
import poolgen

#: the restored_pool fixture (conftest.py)
Restore = Callable[..., Any]
SB_DATA_NR_BLOCKS = 64
SB_DATA_BITMAP_ROOT = 80
SB_META_NR_BLOCKS = 192


def _set_sb(meta: bytearray, offset: int, value: int) -> None:
    struct.pack_into("<Q", meta, offset, value)
    damage.fix_checksum(meta, 0, damage.SALT_SUPERBLOCK)


def _write(path: Path, meta: bytes | bytearray) -> str:
    path.write_bytes(meta)
    return str(path)


def _data_file(path: Path, pool: poolgen.Pool) -> str:
    with open(path, "wb") as f:
        f.truncate(pool.nr_data_blocks * pool.data_block_size * 512)
    return str(path)


def test_wrong_data_index_key_is_one_problem(restored_pool: Restore, tmp_path: Path) -> None:
    """Seed 443479594 input 269: one flipped byte in the data index leaf's first key (checksum
    fixed). Check reported the key, then read block 0 as the missing bitmap and reported all
    60 data blocks' counts; 1.1 reads the entries in order and passes."""
    rp = restored_pool(poolgen.thins_pool(3), nr_meta_blocks=512)
    meta = rp.read()
    leaf = damage.MetaMap(bytes(meta)).nodes_where("data_index", False)[0].block
    struct.pack_into("<Q", meta, leaf * damage.BLOCK + 32, 20)
    damage.fix_checksum(meta, leaf, damage.SALT_BTREE)
    p = _write(tmp_path / "bad.meta", meta)
    assert oracles.check(p, rp.tools)[0] == 0
    problems = check_metadata(p).problems
    assert [(x.field, x.fatal) for x in problems] == [("data space map index", True)]
    assert "keys are not 0..0" in problems[0].message


def test_too_small_data_nr_blocks_leaks_nothing(restored_pool: Restore, tmp_path: Path) -> None:
    """Seed 443479594 input 537: the superblock's data nr_blocks set to 0. The index entry
    beyond it was dropped before its bitmap was counted, so check also called that metadata
    block leaked."""
    rp = restored_pool(poolgen.multilevel_pool(1500), nr_meta_blocks=512)
    meta = rp.read()
    _set_sb(meta, SB_DATA_NR_BLOCKS, 0)
    p = _write(tmp_path / "bad.meta", meta)
    assert oracles.check(p, rp.tools)[0] == 0  # 1.1 does not look at the data device size
    report = check_metadata(p)
    assert not any("leaked" in x.message for x in report.problems), report.problems
    assert any(x.field == "mapping value" and x.scope == "device:1" for x in report.problems)


def test_export_refuses_a_mapping_beyond_the_data_device(restored_pool: Restore, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    """Seed 1294926763 input 93: data nr_blocks set to 5. Check fails the pool (the mappings
    point beyond the data device), but export read the data file at those blocks and exited 0
    (or 2 when the file was short)."""
    pool = poolgen.thins_pool(3)
    rp = restored_pool(pool, nr_meta_blocks=512)
    meta = rp.read()
    _set_sb(meta, SB_DATA_NR_BLOCKS, 5)
    p = _write(tmp_path / "bad.meta", meta)
    data = _data_file(tmp_path / "data", pool)
    scopes = {x.scope for x in check_metadata(p).problems if x.field == "mapping value"}
    assert scopes == {"device:1", "device:2", "device:3"}
    capsys.readouterr()
    rc = main(["export", p, data, "--dev-id", "1", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "beyond the pool's 5 data blocks" in err
    assert not (tmp_path / "out").exists()
    assert main(["dump", p, "-o", str(tmp_path / "dump.xml")]) == 0  # prints values as they are


def test_mappings_beyond_the_data_device_without_a_readable_space_map(restored_pool: Restore,
                                                                      tmp_path: Path) -> None:
    """The same check no longer depends on the data space map being readable (export's
    refusal does not either)."""
    rp = restored_pool(poolgen.thins_pool(3), nr_meta_blocks=512)
    meta = rp.read()
    _set_sb(meta, SB_DATA_NR_BLOCKS, 5)
    _set_sb(meta, SB_DATA_BITMAP_ROOT, 1 << 40)
    problems = check_metadata(_write(tmp_path / "bad.meta", meta)).problems
    assert any(x.field == "mapping value" and x.scope == "device:1" for x in problems)


def test_problems_name_the_structure_readers_need(restored_pool: Restore, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """check --json gives each problem's scope; a reader fails exactly when its scope is hit:
    device 2's leaf damaged stops dump and ls but not an export of device 1."""
    pool = poolgen.thins_pool(3)
    rp = restored_pool(pool, nr_meta_blocks=512)
    raw = rp.read()
    mm = damage.MetaMap(bytes(raw))
    top = mm.nodes_where("top", False)[0].block
    roots = dict(zip(struct.unpack_from("<3Q", raw, top * damage.BLOCK + 32),
                     struct.unpack_from("<3Q", raw, top * damage.BLOCK + 32 + 8 * mm.nodes[top]
                                        .max_entries), strict=True))
    meta = damage.flip_byte(bytes(raw), "btree_leaf", role="bottom",
                            which=sorted(b.block for b in mm.nodes_where("bottom", False))
                            .index(roots[2])).data
    p = _write(tmp_path / "bad.meta", meta)
    data = _data_file(tmp_path / "data", pool)
    capsys.readouterr()
    assert main(["check", "--json", p]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [x["scope"] for x in doc["problems"] if x["fatal"]] == ["device:2"]
    assert main(["dump", p, "-o", str(tmp_path / "d.xml")]) == 1
    assert main(["ls", p]) == 1
    assert main(["export", p, data, "--dev-id", "1", "-o", str(tmp_path / "o")]) == 0


def test_repair_drops_a_data_block_mapped_twice_in_one_leaf(restored_pool: Restore,
                                                             tmp_path: Path) -> None:
    """Seed 2322783378 input 2395: the bottom tree's internal root relabelled a leaf (flags 2,
    checksum fixed). Its child pointers then read as six mappings of data block 0; repair
    kept all six with a count of 6, which thin_check 1.1 rejects (it expects 1)."""
    rp = restored_pool(poolgen.multilevel_pool(1500), nr_meta_blocks=512)
    meta = rp.read()
    node = damage.MetaMap(bytes(meta)).nodes_where("bottom", True)[0]
    struct.pack_into("<I", meta, node.block * damage.BLOCK + 4, 2)
    damage.fix_checksum(meta, node.block, damage.SALT_BTREE)
    p = _write(tmp_path / "bad.meta", meta)
    out = oracles.make_sparse(tmp_path / "repaired.meta", 512)
    assert main(["repair", "-q", "-i", p, "-o", str(out)]) == 0
    assert check_metadata(out).ok()
    assert oracles.check(out, rp.tools)[0] == 0
    dump = main(["dump", str(out), "-o", str(tmp_path / "d.xml")])
    assert dump == 0 and (tmp_path / "d.xml").read_text().count('data_block="0"') == 1


def test_internal_node_pointers_past_the_block_are_damage(restored_pool: Restore,
                                                         tmp_path: Path) -> None:
    """An internal node with value_size 0 and max_entries 504 passes the size bound
    (32 + (8 + 0) x 504 <= 4096), but its u64 child pointers then start at byte 4064 and run
    past the block: every reader died with a numpy ValueError."""
    rp = restored_pool(poolgen.multilevel_pool(1500), nr_meta_blocks=512)
    meta = rp.read()
    node = damage.MetaMap(bytes(meta)).nodes_where("bottom", True)[0]
    struct.pack_into("<II", meta, node.block * damage.BLOCK + 20, 504, 0)  # max_entries, vs
    damage.fix_checksum(meta, node.block, damage.SALT_BTREE)
    p = _write(tmp_path / "bad.meta", meta)
    problems = check_metadata(p).problems
    assert any(x.field == "max_entries" and x.block == node.block and x.scope == "device:1"
               for x in problems), problems
    assert oracles.check(p, rp.tools)[0] != 0
    for argv in (["dump", p, "-o", str(tmp_path / "d.xml")], ["ls", p],
                 ["rmap", "--region", "0..10", p]):
        assert main(argv) == 1


def test_repair_drops_a_data_block_mapped_twice_in_one_device(restored_pool: Restore,
                                                              tmp_path: Path) -> None:
    """Seed 1964916683 input 708: one mapping's value damaged to a data block another leaf
    of the same device maps (checksum fixed). Repair kept both with a count of 2; thin_check
    1.1 rejects that output (it expects 1)."""
    rp = restored_pool(poolgen.multilevel_pool(1500), nr_meta_blocks=512)
    meta = rp.read()
    leaves = damage.MetaMap(bytes(meta)).nodes_where("bottom", False)
    first, other = leaves[0], leaves[1]

    def value_off(n: damage.Node) -> int:
        return n.block * damage.BLOCK + 32 + 8 * n.max_entries

    (taken,) = struct.unpack_from("<Q", meta, value_off(first))
    struct.pack_into("<Q", meta, value_off(other), taken)
    damage.fix_checksum(meta, other.block, damage.SALT_BTREE)
    p = _write(tmp_path / "bad.meta", meta)
    out = oracles.make_sparse(tmp_path / "repaired.meta", 512)
    assert main(["repair", "-q", "-i", p, "-o", str(out)]) == 0
    assert check_metadata(out).ok()
    assert oracles.check(out, rp.tools)[0] == 0
    assert check_metadata(out).nr_mappings == 1499


def test_ls_and_rmap_check_a_shared_subtree_against_each_parent(restored_pool: Restore,
                                                                tmp_path: Path) -> None:
    """Seed 4022491230 input 9494: device 2's first child pointer redirected to a subtree of
    device 1 whose keys (400..798) lie outside that slot's range (0..399). Check and dump
    fail it; ls and rmap read a node once and did not check it under its second parent, so
    they listed device 2 from keys the kernel would never find there."""
    import fuzz_damage

    rp = restored_pool(poolgen.snapshot_pool(400), nr_meta_blocks=512)
    raw = bytes(rp.read())
    bad = fuzz_damage.apply(raw, [("field", 9402, "value0", 2)], fuzz_damage.used_blocks(raw))
    p = _write(tmp_path / "bad.meta", bad)
    scopes = {x.scope for x in check_metadata(p).problems if x.fatal and x.field == "keys"}
    assert scopes == {"device:2"}
    assert main(["dump", p, "-o", str(tmp_path / "d.xml")]) == 1
    assert main(["ls", p]) == 1
    assert main(["rmap", "--region", "0..10", p]) == 1


def test_leaf_key_at_the_next_separator_loses_that_mapping_only(restored_pool: Restore,
                                                                tmp_path: Path) -> None:
    """Seed 3395293201 input 872: one separator key of device 1's bottom root lowered by one
    (2258 -> 2257, checksum fixed), so the leaf before it ends with the separator's key. 1.1
    passes it (it takes the range's end as inclusive); the kernel routes 2257 to the next leaf
    and never finds it. check dropped the whole leaf (252 mappings lost, 252 data blocks
    leaked); it now loses only the one mapping the kernel cannot reach."""
    pool = poolgen.multilevel_pool(1500)
    rp = restored_pool(pool, nr_meta_blocks=512)
    meta = rp.read()
    root = damage.MetaMap(bytes(meta)).nodes_where("bottom", True)[0].block
    off = root * damage.BLOCK
    nr, max_entries = struct.unpack_from("<II", meta, off + 16)
    keys = list(struct.unpack_from(f"<{nr}Q", meta, off + 32))
    children = struct.unpack_from(f"<{nr}Q", meta, off + 32 + 8 * max_entries)
    i = 3
    struct.pack_into("<Q", meta, off + 32 + 8 * i, keys[i] - 1)
    damage.fix_checksum(meta, root, damage.SALT_BTREE)
    p = _write(tmp_path / "bad.meta", meta)
    assert oracles.check(p, rp.tools)[0] == 0
    # the mapping lost: the previous leaf's last key, which the pool has at keys[i] - 1
    dev = pool.devices[0]
    (row,) = dev.mappings[dev.mappings[:, 0] == keys[i] - 1]
    lost_data = int(row[1])
    report = check_metadata(p)
    got = [(x.scope, x.block, x.field, x.fatal) for x in report.problems]
    assert got == [("device:1", children[i - 1], "keys", True),
                   ("device:1", None, "mapped_blocks", True),
                   ("data-space-map", None, None, False)], report.problems
    assert f"holds {len(dev.mappings) - 1}" in report.problems[1].message
    assert report.leaked_data_blocks == [lost_data]
    assert report.nr_mappings == len(dev.mappings) - 1
    verdict = fuzz_judge.verdict_failure(False, True, report.to_json()["problems"])
    assert verdict == (None, "key-at-range-end")


def test_a_leaf_cut_on_one_path_counts_whole_on_another(restored_pool: Restore,
                                                        tmp_path: Path) -> None:
    """The same damage, walked as if the leaf were shared: once under the lowered separator
    (its last key cut) and once as a tree of its own (whole). Whichever walk comes first, each
    path counts what it reaches and the leaf's entries are visited exactly once in all."""
    pool = poolgen.multilevel_pool(1500)
    meta = restored_pool(pool, nr_meta_blocks=512).read()
    root = damage.MetaMap(bytes(meta)).nodes_where("bottom", True)[0].block
    off = root * damage.BLOCK
    nr, max_entries = struct.unpack_from("<II", meta, off + 16)
    sep = struct.unpack_from("<Q", meta, off + 32 + 8 * 3)[0]
    leaf = struct.unpack_from("<Q", meta, off + 32 + 8 * max_entries + 8 * 2)[0]
    leaf_nr = struct.unpack_from("<I", meta, leaf * damage.BLOCK + 16)[0]
    struct.pack_into("<Q", meta, off + 32 + 8 * 3, sep - 1)
    damage.fix_checksum(meta, root, damage.SALT_BTREE)
    p = _write(tmp_path / "bad.meta", meta)
    n = len(pool.devices[0].mappings)

    def walk(order: tuple[int, int]) -> tuple[dict[int, int], list[int], list[str]]:
        seen: list[int] = []
        errors: list[str] = []
        got = {}
        with BlockReader(p) as reader:
            walker = BtreeWalker(reader, on_error=lambda e: errors.append(str(e)))
            for r in order:
                s = walker.walk(r, MAPPING_VALUE_SIZE,
                                lambda node: seen.extend(node.keys.tolist()))
                assert s is not None
                got[r] = s.entries
        return got, seen, errors

    for order in ((root, leaf), (leaf, root)):
        got, seen, errors = walk(order)
        assert got[root] == n - 1 and got[leaf] == leaf_nr, (order, got)
        assert sorted(seen) == sorted(pool.devices[0].mappings[:, 0].tolist()), order
        assert len(errors) == 1 and f"..{sep - 1} outside" in errors[0], errors


def test_a_root_reached_again_as_a_child_is_held_to_the_fill_rule(
        restored_pool: Restore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Seed 2112707547 input 3518: device 3's first child pointer set to the top-level leaf
    (3 entries; checksum fixed). That leaf was walked first as the top-level root, exempt from
    the fill rule, and check did not apply it when the leaf came back as device 3's child:
    it reported only the mapped_blocks the readers do not stop at, while dump refused the
    underfull node. check now reports it under device 3."""
    pool = poolgen.snapshot_pool(400)
    rp = restored_pool(pool, nr_meta_blocks=512)
    meta = rp.read()
    mm = damage.MetaMap(bytes(meta))
    top = mm.nodes_where("top", False)[0].block
    top_max = mm.nodes[top].max_entries
    nr = mm.nodes[top].nr_entries
    roots = dict(zip(struct.unpack_from(f"<{nr}Q", meta, top * damage.BLOCK + 32),
                     struct.unpack_from(f"<{nr}Q", meta, top * damage.BLOCK + 32 + 8 * top_max),
                     strict=True))
    root3 = roots[3]
    assert mm.nodes[root3].internal
    max3 = mm.nodes[root3].max_entries
    struct.pack_into("<Q", meta, root3 * damage.BLOCK + 32 + 8 * max3, top)
    damage.fix_checksum(meta, root3, damage.SALT_BTREE)
    p = _write(tmp_path / "bad.meta", meta)
    assert oracles.check(p, rp.tools)[0] != 0
    fatal = [x for x in check_metadata(p).problems if x.fatal]
    assert [(x.scope, x.block, x.field) for x in fatal if "underfull" in x.message] == [
        ("device:3", top, "nr_entries")], fatal
    capsys.readouterr()
    assert main(["dump", p, "-o", str(tmp_path / "d.xml")]) == 1
    assert main(["ls", p]) == 0  # ls counts underfull nodes like any other (docs/tools.md)


def test_data_index_root_at_a_mapping_leaf_hidden_from_1_1(restored_pool: Restore,
                                                           tmp_path: Path) -> None:
    """Seed 2112707547 input 4987: the data space map's index root set to a mapping leaf, and
    the metadata space map's nr_blocks to 0. 1.1 walks the data index skipping nodes it has
    seen, so it reads no index entries and checks no data counts; alone, it still fails on
    the metadata blocks that leak, but nr_blocks 0 hides those. The data index problems are
    excused by data-index-root-seen, mutation by mutation (fuzz_run.Run)."""
    rp = restored_pool(poolgen.multilevel_pool(1500), nr_meta_blocks=512)
    meta = rp.read()
    leaf = damage.MetaMap(bytes(meta)).nodes_where("bottom", False)[0].block
    _set_sb(meta, SB_DATA_BITMAP_ROOT, leaf)
    alone = _write(tmp_path / "alone.meta", meta)
    _set_sb(meta, SB_META_NR_BLOCKS, 0)
    both = _write(tmp_path / "both.meta", meta)
    meta = rp.read()
    _set_sb(meta, SB_META_NR_BLOCKS, 0)
    other = _write(tmp_path / "other.meta", meta)
    assert oracles.check(alone, rp.tools)[0] != 0
    assert oracles.check(both, rp.tools)[0] == 0
    assert oracles.check(other, rp.tools)[0] == 0

    def problems(p: str) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], check_metadata(p).to_json()["problems"])

    a, b, whole = problems(alone), problems(other), problems(both)
    assert fuzz_judge.verdict_failure(False, True, whole)[0] is not None  # no single rule
    assert fuzz_judge.verdict_failure(False, True, b) == (None, "metadata-nr-blocks-too-small")
    parts = SimpleNamespace(parts=[SimpleNamespace(problems=a, rule=None),
                                   SimpleNamespace(problems=b,
                                                   rule="metadata-nr-blocks-too-small")])
    assert all(fuzz_run.Run._explained_by_parts(p, cast(Any, parts)) for p in whole), whole
    data_sm = [p for p in a if p["scope"] == "data-space-map"]
    assert fuzz_judge.verdict_failure(False, True, data_sm) == (None, "data-index-root-seen")


def test_readers_refuse_an_unknown_incompat_feature(restored_pool: Restore, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Seed 1132727687 input 720: a checksum-fixed flip set incompat_flags to 0xba. check
    failed the pool (the kernel refuses it: vmtests/test_refusals.py) but dump, ls, rmap,
    delta and export read it as if the flags were 0. They now refuse it, naming the field."""
    rp = restored_pool(poolgen.thins_pool(3), nr_meta_blocks=512)
    meta = rp.read()
    struct.pack_into("<I", meta, 360, 0xBA)
    damage.fix_checksum(meta, 0, damage.SALT_SUPERBLOCK)
    p = _write(tmp_path / "bad.meta", meta)
    assert [x.field for x in check_metadata(p).problems] == ["incompat_flags"]
    for argv in (["dump", p, "-o", str(tmp_path / "d.xml")], ["ls", p]):
        capsys.readouterr()
        assert main(argv) == 1, argv
        assert "incompat_flags 0xba" in capsys.readouterr().err


def test_ls_and_rmap_list_an_empty_leaf_under_a_node(restored_pool: Restore,
                                                     tmp_path: Path) -> None:
    """Seed 1211243454 input 9383: a multi-level pool whose leaf lost its entries (nr_entries
    0) and a damaged superblock. ls and rmap read the sibling leaves as one batch and indexed
    the empty leaf's first key past the batch (IndexError); now they list what the other
    leaves hold, and exit as they do for every other damage."""
    import fuzz_damage

    rp = restored_pool(poolgen.multilevel_pool(1500), nr_meta_blocks=512)
    raw = bytes(rp.read())
    recipe = [("named", 21), ("sbroot", "data_nr_blocks", 3827),
              ("field", 6630, "nr_entries", 1 << 63)]
    bad = fuzz_damage.apply(raw, recipe, fuzz_damage.used_blocks(raw))
    p = _write(tmp_path / "bad.meta", bad)
    for argv in (["ls", p], ["rmap", "--region", "0..100000", p]):
        assert main(argv) in (0, 1), argv
    one = fuzz_damage.apply(raw, recipe[2:], fuzz_damage.used_blocks(raw))
    p1 = _write(tmp_path / "one.meta", one)
    assert main(["ls", p1]) in (0, 1)
    assert main(["rmap", "--region", "0..100000", p1]) in (0, 1)


def _data_count_word(meta: bytearray, mm: damage.MetaMap, b: int) -> tuple[int, int, int]:
    """(bitmap block, offset of the 64-bit word holding data block ``b``'s 2-bit count, the
    count's shift in it): the layout damage._decode_counts reads."""
    e = b % 16320
    bm = mm.data_bitmaps[b // 16320]
    return bm, bm * damage.BLOCK + 16 + 8 * (e // 32), 2 * (e % 32)


def _data_bitmap_count(meta: bytearray, mm: damage.MetaMap, b: int) -> int:
    _, off, j = _data_count_word(meta, mm, b)
    word = int.from_bytes(meta[off:off + 8], "little")
    return ((word >> j) & 1) << 1 | (word >> (j + 1)) & 1


def _set_data_count(meta: bytearray, mm: damage.MetaMap, b: int, count: int) -> None:
    bm, off, j = _data_count_word(meta, mm, b)
    word = int.from_bytes(meta[off:off + 8], "little") & ~(3 << j)
    word |= ((count >> 1) & 1) << j | (count & 1) << (j + 1)
    struct.pack_into("<Q", meta, off, word)
    damage.fix_checksum(meta, bm, damage.SALT_BITMAP)


def test_a_ref_count_entry_no_bitmap_count_sends_a_lookup_to_is_no_damage(
        restored_pool: Restore, tmp_path: Path, tools09: oracles.Tools) -> None:
    """Seed 1805116920 input 6831: the data ref-count tree's (empty) root leaf given
    nr_entries 1, i.e. an entry "block 0: count 0". Only a bitmap count of 3 sends a lookup
    to that tree, so the kernel and thin_check 0.9 never read the entry; 1.1 takes its count
    as the block's, which for an unused block 0 is its count anyway: all three pass it.
    (Where the counts differ, and in the metadata space map, 1.1 fails it: below.)
    Check called it two fatal problems (an entry for a block counted below 3, a count
    below 3)."""
    rp = restored_pool(poolgen.multilevel_pool(1500), nr_meta_blocks=512)
    meta = rp.read()
    mm = damage.MetaMap(bytes(meta))
    (leaf,) = mm.nodes_where("data_refcount")
    struct.pack_into("<I", meta, leaf.block * damage.BLOCK + 16, 1)
    damage.fix_checksum(meta, leaf.block, damage.SALT_BTREE)
    p = _write(tmp_path / "bad.meta", meta)
    assert oracles.check(p, rp.tools)[0] == 0
    assert oracles.check(p, tools09)[0] == 0
    report = check_metadata(p)
    assert report.ok(), report.problems
    assert main(["check", p]) == 0

    # Seed 2175818804 inputs 974 and 7029: the same in the *metadata* ref-count tree. The
    # kernel ignores it there too, but thin_check 1.1 takes the entry's count (0) as block
    # 0's and fails it, and check may not be weaker than 1.1: it still refuses it.
    meta = rp.read()
    (leaf,) = mm.nodes_where("meta_refcount")
    struct.pack_into("<I", meta, leaf.block * damage.BLOCK + 16, 1)
    damage.fix_checksum(meta, leaf.block, damage.SALT_BTREE)
    p = _write(tmp_path / "bad-meta-sm.meta", meta)
    assert oracles.check(p, rp.tools)[0] != 0
    problems = check_metadata(p).problems
    assert problems and all(x.field == "ref_count_root" for x in problems), problems

    # Seed 2906864924 input 4509: the same entry in the *data* tree of a pool whose data
    # block 0 is mapped (bitmap count 1). The kernel and 0.9 still ignore it, but 1.1 takes
    # the entry's 0 as block 0's count and fails it ("Expected 1, but space map contains
    # 0"); an entry agreeing with its bitmap count (above: block 0 unused) changes nothing.
    rp3 = restored_pool(poolgen.thins_pool(3), nr_meta_blocks=512)
    meta = rp3.read()
    mm3 = damage.MetaMap(bytes(meta))
    assert _data_bitmap_count(meta, mm3, 0) == 1
    (leaf,) = mm3.nodes_where("data_refcount")
    struct.pack_into("<I", meta, leaf.block * damage.BLOCK + 16, 1)
    damage.fix_checksum(meta, leaf.block, damage.SALT_BTREE)
    p = _write(tmp_path / "bad-data-sm.meta", meta)
    assert oracles.check(p, rp3.tools)[0] != 0
    assert oracles.check(p, tools09)[0] == 0
    problems = check_metadata(p).problems
    assert [(x.field, x.fatal) for x in problems] == [("ref_count_root", True)], problems
    assert "block 0 with count 0, whose bitmap count is 1" in problems[0].message


def test_an_overflow_count_hidden_by_its_bitmap_is_still_damage(
        restored_pool: Restore, tmp_path: Path) -> None:
    """The other side of the test above: data block 10 (mapped by 5 devices, its count in the
    ref-count tree) with its bitmap count set to 1 leaves the tree's entry unread, and
    block 10's count is then wrong: check and thin_check 1.1 both fail it."""
    rp = restored_pool(poolgen.overflow_pool(5), nr_meta_blocks=512)
    meta = rp.read()
    mm = damage.MetaMap(bytes(meta))
    assert damage.data_counts(bytes(meta))[10] == 5 and _data_bitmap_count(meta, mm, 10) == 3
    _set_data_count(meta, mm, 10, 1)
    assert _data_bitmap_count(meta, mm, 10) == 1
    p = _write(tmp_path / "bad.meta", meta)
    assert oracles.check(p, rp.tools)[0] != 0
    problems = check_metadata(p).problems
    assert [x.fatal for x in problems if "wrong reference counts" in x.message] == [True], \
        problems


@pytest.mark.parametrize("high", [1 << 32, 1 << 52, 1 << 63])
def test_child_pointer_high_bits_are_what_1_1_alone_ignores(
        restored_pool: Restore, tmp_path: Path, tools09: oracles.Tools, high: int,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Seeds 4100220246 input 8218 and 3719521081 input 8045: a byte of an internal node's
    child pointer flipped above the low 32 bits (checksum fixed). thin_check 1.1 reads only
    the low 32 bits and passes; 0.9 (and the kernel) read all 64 and fail, and so does
    check. Named "child-pointer-high-bits" only as a counterfactual: with the pointer cut to
    its low 32 bits the input must check clean -- a pointer whose low bits name another
    block is not excused."""
    rp = restored_pool(poolgen.multilevel_pool(1500), nr_meta_blocks=512)
    meta = rp.read()
    node = damage.MetaMap(bytes(meta)).nodes_where("bottom", True)[0]
    slot = node.block * damage.BLOCK + 32 + 8 * node.max_entries + 8
    (child,) = struct.unpack_from("<Q", meta, slot)
    used = sorted(damage.scan(bytes(meta)))

    def check_json(path: str) -> list[dict[str, Any]]:
        capsys.readouterr()
        main(["check", "--json", path])
        return cast(list[dict[str, Any]], json.loads(capsys.readouterr().out)["problems"])

    def judged(pointer: int) -> tuple[int, list[dict[str, Any]], Any]:
        bad = bytearray(meta)
        struct.pack_into("<Q", bad, slot, pointer)
        damage.fix_checksum(bad, node.block, damage.SALT_BTREE)
        p = _write(tmp_path / "bad.meta", bad)
        rc = oracles.check(p, rp.tools)[0]
        assert oracles.check(p, tools09)[0] != 0
        problems = check_json(p)
        assert problems
        normalized = bytearray(bad)
        assert fuzz_run.normalize_headers(normalized, used)
        q = _write(tmp_path / "normalized.meta", normalized)
        return rc, problems, check_json(q)

    rc, problems, after = judged(child + high)
    assert rc == 0 and after == []
    assert fuzz_judge.verdict_failure(False, True, problems, after) == (
        None, "child-pointer-high-bits")
    other = next(b for b in used if b not in (child, 0))
    rc, problems, after = judged(other + high)
    assert after  # the low bits name a wrong child: damage either way
    if rc == 0:  # whatever 1.1 makes of it, the rule does not excuse it
        assert fuzz_judge.verdict_failure(False, True, problems, after)[1] is None


def test_ls_lists_despite_a_data_size_no_metadata_device_could_map(
        restored_pool: Restore, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        tools09: oracles.Tools) -> None:
    """Seed 3097145373 input 9323 / seed 20261202 input 6828: the superblock's data nr_blocks
    grown to ~2^55. ls once sized its per-data-block counts by it and died "out of memory";
    ls only counts mappings, so it now lists the pool as before the damage and as thin_ls 0.9
    does (1.1 aborts on the allocation), while check names the field."""
    rp = restored_pool(poolgen.thins_pool(3), nr_meta_blocks=512)
    meta = rp.read()
    good = _write(tmp_path / "good.meta", meta)
    _set_sb(meta, SB_DATA_NR_BLOCKS, 33214047251858432)
    p = _write(tmp_path / "big.meta", meta)
    report = check_metadata(p)
    assert any(x.field == "data space map root nr_blocks" for x in report.problems)
    assert oracles.check(p, rp.tools)[0] != 0  # thin_check 1.1 refuses it as well
    fields = "DEV,MAPPED,EXCLUSIVE,SHARED"
    assert main(["ls", "--no-headers", "-o", fields, good]) == 0
    before = capsys.readouterr().out
    assert main(["ls", "--no-headers", "-o", fields, p]) == 0
    assert capsys.readouterr().out == before
    theirs = subprocess.run([str(tools09.bindir / "thin_ls"), "--no-headers", "-o", fields, p],
                            capture_output=True, text=True, check=True)
    # 0.9 prints a zero size as "0", dmimage as 1.1 does ("0b")
    assert [r.split() for r in theirs.stdout.splitlines()] == \
        [["0" if w == "0b" else w for w in r.split()] for r in before.splitlines()]
