"""`dmimage cache repair` on a corpus of hand-damaged metadata written by cache_restore 1.1
(versions 1 and 2; a large cache whose array btrees have several leaves), judged by
thin-provisioning-tools 1.1: every repaired output passes cache_check 1.1 and `cache check`;
what cache_dump 1.1 shows of it is the pristine dump minus exactly the damaged part (computed
from the format: array block i holds entries i*509 .. i*509+508), with lost dirty bits
counted as dirty; and it holds at least what cache_repair 1.1 recovers (which gives up on
any damaged mapping or hint array block)."""

from __future__ import annotations

import os
import random
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import restore_xml

from dmimage.cli.main import main
from dmimage.format.checksum import seal
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import BtreeWalker, Node

import oracles

TOOLS = oracles.tools_11()
PDATA = str(TOOLS.bindir / "pdata_tools")
BS = 4096
#: entries per array block: (4096 - 24-byte header) / value size
PER8, PER4 = (BS - 24) // 8, (BS - 24) // 4
SALT_ARRAY = 595846735

CASES = [(1, 5000, 0.5), (2, 5000, 0.5), (2, 140_000, 0.3)]
MAP_RE = re.compile(rb'<mapping cache_block="(\d+)" origin_block="(\d+)" dirty="(\w+)"/>')
HINT_RE = re.compile(rb'<hint cache_block="(\d+)" data="([^"]*)"/>')


def tool(name: str, *argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([PDATA, name, *argv], capture_output=True, timeout=300)


@dataclass
class Pristine:
    meta: Path
    version: int
    dump: bytes
    #: structure -> block numbers (array blocks in index order; btree leaves)
    blocks: dict[str, list[int]]


def _layout(meta: Path) -> dict[str, list[int]]:
    from dmimage.cache.metadata import parse_superblock
    from dmimage.pdata.array import read_array

    out: dict[str, list[int]] = {}
    with BlockReader(str(meta)) as reader:
        sb = parse_superblock(reader.block(0))
        walker = BtreeWalker(reader)
        roots = {"mapping": sb.mapping_root, "hint": sb.hint_root, "dirty": sb.dirty_root}
        for name, root in roots.items():
            if not root:
                continue
            vs = 4 if name == "hint" else 8
            out[name] = read_array(walker, root, vs, name).blocks
            leaves: list[int] = []

            def leaf(node: Node, acc: list[int] = leaves) -> None:
                acc.append(node.blocknr)
            BtreeWalker(reader).walk(root, 8, leaf)
            out[name + "-leaves"] = leaves
            out[name + "-root"] = [root]
        out["discard"] = [sb.discard_root]
        out["sm"] = [sb.metadata_sm.bitmap_root, sb.metadata_sm.ref_count_root]
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> list[Pristine]:
    tmp = tmp_path_factory.mktemp("cache-repair")
    rng = random.Random(13)
    out = []
    for i, (version, n, fill) in enumerate(CASES):
        src, meta = tmp / f"c{i}.xml", tmp / f"c{i}.meta"
        src.write_text(restore_xml.cache_xml(rng, n, fill))
        oracles.make_sparse(meta, 2048)
        res = tool("cache_restore", "-i", str(src), "-o", str(meta), "--metadata-version",
                   str(version))
        assert res.returncode == 0, res.stderr
        dump = tool("cache_dump", str(meta))
        assert dump.returncode == 0
        out.append(Pristine(meta, version, dump.stdout, _layout(meta)))
    return out


def _parse(dump: bytes) -> tuple[dict[int, tuple[int, bool]], dict[int, bytes]]:
    maps = {int(c): (int(o), d == b"true") for c, o, d in MAP_RE.findall(dump)}
    hints = {int(c): h for c, h in HINT_RE.findall(dump)}
    return maps, hints


def _zero(buf: bytearray, *blocks: int) -> None:
    for b in blocks:
        buf[b * BS:(b + 1) * BS] = bytes(BS)


def _edit_mapping(buf: bytearray, block: int, entry: int, fn: object) -> None:
    """Rewrite one mapping value of an array block and reseal it (damage the checksum
    cannot see)."""
    off = block * BS + 24 + entry * 8
    (v,) = struct.unpack_from("<Q", buf, off)
    struct.pack_into("<Q", buf, off, fn(v))  # type: ignore[operator]
    raw = np.frombuffer(buf, np.uint8)[block * BS:(block + 1) * BS].copy()
    seal(raw, SALT_ARRAY)
    buf[block * BS:(block + 1) * BS] = raw.tobytes()


#: name -> (damage, cache blocks expected lost, hints expected lost, dirty bits expected lost)
def _damages(p: Pristine, n: int) -> dict[str, tuple[bytearray, set[int], set[int], set[int]]]:
    src = p.meta.read_bytes()
    L = p.blocks
    out = {}

    def case(name: str, lost: set[int] = frozenset(),  # type: ignore[assignment]
             lost_hints: set[int] = frozenset(),  # type: ignore[assignment]
             lost_dirty: set[int] = frozenset()) -> bytearray:  # type: ignore[assignment]
        buf = bytearray(src)
        out[name] = (buf, set(lost), set(lost_hints), set(lost_dirty))
        return buf

    case("sb-csum")[100] ^= 1  # inside the space map root: repair rebuilds it
    mid = len(L["mapping"]) // 2
    span = set(range(mid * PER8, min(n, (mid + 1) * PER8)))
    _zero(case("mapping-array-block", lost=span), L["mapping"][mid])
    hmid = len(L["hint"]) // 2
    _zero(case("hint-array-block", lost_hints=set(range(hmid * PER4, (hmid + 1) * PER4))),
          L["hint"][hmid])
    if len(L["mapping-leaves"]) > 1:  # a leaf of the array btree: its array blocks are lost
        # leaves hold array blocks in index order: count the first leaf's entries
        with BlockReader(str(p.meta)) as r:
            nr0 = struct.unpack_from("<I", r.block(L["mapping-leaves"][0]), 16)[0]
        _zero(case("mapping-btree-leaf", lost=set(range(0, nr0 * PER8))),
              L["mapping-leaves"][0])
    else:
        _zero(case("mapping-btree-root", lost=set(range(n))), L["mapping-root"][0])
    if p.version == 2:
        _zero(case("dirty-bitset-block", lost_dirty=set(range(0, min(n, PER8 * 64)))),
              L["dirty"][0])
    _zero(case("discard-bitset"), *L["discard"])
    _zero(case("space-map"), *L["sm"])
    # a mapping with a flag bit no version defines, its array block resealed
    bad = case("mapping-unknown-flag")  # cleared, the mapping kept (as 1.1 keeps it)
    mapped = min(c for c in _parse(p.dump)[0] if c >= PER8)
    _edit_mapping(bad, L["mapping"][mapped // PER8], mapped % PER8, lambda v: v | 0x10)
    # the file cut off where the mapping tree's root lies
    buf = case("truncated", lost=set(range(n)))
    del buf[L["mapping-root"][0] * BS:]
    return out


@pytest.mark.parametrize("i", range(len(CASES)))
def test_repair_corpus(pristine: list[Pristine], tmp_path: Path, i: int,
                       capsys: pytest.CaptureFixture[str]) -> None:
    p = pristine[i]
    n = CASES[i][1]
    maps0, hints0 = _parse(p.dump)
    beats = []
    damages = _damages(p, n)
    for name, (buf, lost, lost_hints, lost_dirty) in damages.items():
        bad, ours, theirs = (tmp_path / f"{name}.{x}" for x in ("bad", "ours", "theirs"))
        bad.write_bytes(bytes(buf))
        for out in (ours, theirs):
            oracles.make_sparse(out, 2048)
        before = bad.read_bytes()
        rc = main(["cache", "repair", "-i", str(bad), "-o", str(ours)])
        err = capsys.readouterr().err
        assert rc == 0, f"{name}: {err}"
        assert bad.read_bytes() == before, f"{name}: the input was written"
        # nothing dump shows lives in the discard bitset or the space map
        assert ("lost:" in err) == (name not in ("discard-bitset", "space-map")), (name, err)
        assert tool("cache_check", str(ours)).returncode == 0, name
        assert main(["cache", "check", "-q", str(ours)]) == 0, name
        dump = tool("cache_dump", str(ours))
        assert dump.returncode == 0
        maps, hints = _parse(dump.stdout)
        # exactly the damaged part is lost; everything else is the pristine mapping
        want = {c: m for c, m in maps0.items() if c not in lost}
        assert {c: o for c, (o, _d) in maps.items()} == {c: o for c, (o, _d) in want.items()}, \
            name
        for c, (_o, d) in maps.items():
            assert d == (maps0[c][1] or c in lost_dirty), f"{name}: cache block {c} dirty"
        zero = b"AAAAAA=="
        for c in maps:
            assert hints[c] == (zero if c in lost_hints else hints0.get(c, zero)), \
                f"{name}: hint of {c}"
        # at least what cache_repair 1.1 recovers
        t = tool("cache_repair", "-i", str(bad), "-o", str(theirs))
        if t.returncode == 0:
            tmaps, _ = _parse(tool("cache_dump", str(theirs)).stdout)
            assert set(tmaps.items()) <= set(maps.items()), name
        else:
            beats.append(name)
    # 1.1 gives up where the damage is in the arrays themselves
    assert {"mapping-array-block", "hint-array-block", "sb-csum"} <= set(beats)


def test_repair_refusals(pristine: list[Pristine], tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    """A zeroed superblock leaves nothing to salvage (exit 1, one line, output untouched);
    repairing onto the input itself or onto a too small output is a usage/I/O error (2)."""
    p = pristine[0]
    bad, out, small = tmp_path / "bad", tmp_path / "out", tmp_path / "small"
    buf = bytearray(p.meta.read_bytes())
    _zero(buf, 0)
    bad.write_bytes(bytes(buf))
    out.write_bytes(b"x" * BS * 8)
    assert main(["cache", "repair", "-i", str(bad), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "superblock" in err and "Traceback" not in err
    assert out.read_bytes() == b"x" * BS * 8
    assert tool("cache_repair", "-i", str(bad), "-o", str(out)).returncode != 0
    before = p.meta.read_bytes()
    assert main(["cache", "repair", "-i", str(p.meta), "-o", str(p.meta)]) == 2
    assert "same file" in capsys.readouterr().err and p.meta.read_bytes() == before
    small.write_bytes(bytes(BS * 2))
    assert main(["cache", "repair", "-i", str(p.meta), "-o", str(small)]) == 2
    assert "too small" in capsys.readouterr().err and small.read_bytes() == bytes(BS * 2)
    link = tmp_path / "link"
    os.symlink(p.meta, link)
    assert main(["cache", "repair", "-i", str(p.meta), "-o", str(link)]) == 2


def test_random_damage_repairs_or_refuses(pristine: list[Pristine], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Random damage (a used block zeroed, a random byte flipped, the file cut short): repair
    exits 0 with an output both checkers pass, or 1 (superblock unusable) with one line;
    never a traceback."""
    rng = random.Random(1313)
    out = tmp_path / "out"
    for p in pristine[:2]:
        src = p.meta.read_bytes()
        used = max(b for blocks in p.blocks.values() for b in blocks) + 1
        for k in range(20):
            buf = bytearray(src)
            kind = k % 3
            if kind == 0:
                _zero(buf, rng.randrange(used))
            elif kind == 1:
                buf[rng.randrange(used * BS)] ^= 1 << rng.randrange(8)
            else:
                del buf[rng.randrange(1, used) * BS:]
            bad = tmp_path / "bad"
            bad.write_bytes(bytes(buf))
            oracles.make_sparse(out, 2048)
            rc = main(["cache", "repair", "-q", "-i", str(bad), "-o", str(out)])
            err = capsys.readouterr().err
            assert "Traceback" not in err
            if rc == 0:
                assert tool("cache_check", str(out)).returncode == 0, (p.meta.name, k)
                assert main(["cache", "check", "-q", str(out)]) == 0, (p.meta.name, k)
            else:
                assert rc == 1 and len(err.strip().splitlines()) == 1, (k, err)
