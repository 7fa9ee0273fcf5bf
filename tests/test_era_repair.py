"""`dmimage era repair` on hand-damaged metadata written by era_restore 1.1 (a small era and
one of 40,000 blocks whose bitsets and era array span several array blocks), judged by 1.1:
every repaired output passes era_check 1.1 and `era check`; era_invalidate 1.1 on the repair
lists, for every threshold, at least the blocks it lists on the pristine metadata (a repair
must never call a written block unchanged), and exactly those where nothing was lost; what
era_dump 1.1 shows is the pristine dump with exactly the damaged part set to "written".
era_repair 1.1 recovers only the damaged space map here (the same dump as ours) and fails
on the pristine metadata itself; the test records that rather than assumes it."""

from __future__ import annotations

import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import restore_xml

from dmimage.cli.main import main
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import BtreeWalker

import oracles

TOOLS = oracles.tools_11()
PDATA = str(TOOLS.bindir / "pdata_tools")
BS = 4096
PER8, PER4 = (BS - 24) // 8, (BS - 24) // 4

CASES = [(3000, [5, 6, 7], 7), (40_000, [10, 11, 12], 12)]
BIT_RE = re.compile(rb'<bit block="(\d+)" value="(\w+)"/>')
ERA_RE = re.compile(rb'<era block="(\d+)" era="(\d+)"/>')


def tool(name: str, *argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([PDATA, name, *argv], capture_output=True, timeout=300)


@dataclass
class Pristine:
    meta: Path
    nr_blocks: int
    eras: list[int]
    current: int
    blocks: dict[str, list[int]]


def _layout(meta: Path) -> dict[str, list[int]]:
    from dmimage.era.metadata import parse_superblock, read_writeset_tree
    from dmimage.pdata.array import read_array

    with BlockReader(str(meta)) as reader:
        sb = parse_superblock(reader.block(0))
        walker = BtreeWalker(reader)
        out = {"tree-root": [sb.writeset_tree_root],
               "era-array": read_array(walker, sb.era_array_root, 4, "e").blocks,
               "sm": [sb.metadata_sm.bitmap_root, sb.metadata_sm.ref_count_root]}
        for era, (_n, root) in read_writeset_tree(walker, sb.writeset_tree_root).items():
            out[f"ws{era}"] = read_array(walker, root, 8, "w").blocks
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> list[Pristine]:
    tmp = tmp_path_factory.mktemp("era-repair")
    rng = random.Random(31)
    out = []
    for i, (n, eras, cur) in enumerate(CASES):
        src, meta = tmp / f"e{i}.xml", tmp / f"e{i}.meta"
        src.write_text(restore_xml.era_xml(rng, n, eras, cur))
        oracles.make_sparse(meta, 2048)
        assert tool("era_restore", "-i", str(src), "-o", str(meta)).returncode == 0
        out.append(Pristine(meta, n, eras, cur, _layout(meta)))
    return out


def _dump(meta: Path) -> tuple[dict[int, np.ndarray], np.ndarray]:
    res = tool("era_dump", str(meta))
    assert res.returncode == 0, res.stderr
    sets: dict[int, np.ndarray] = {}
    for part in res.stdout.split(b"<writeset era=")[1:]:
        era = int(part.split(b'"')[1])
        bits = BIT_RE.findall(part)
        sets[era] = np.array([v == b"true" for _b, v in bits], bool)
    eras = np.array([int(e) for _b, e in ERA_RE.findall(res.stdout)], np.uint32)
    return sets, eras


def _invalidate(meta: Path, since: int) -> np.ndarray:
    res = tool("era_invalidate", "--written-since", str(since), str(meta))
    assert res.returncode == 0, res.stderr
    out = set()
    for m in re.finditer(rb'<block block="(\d+)"/>|<range begin="(\d+)" end="(\d+)"/>',
                         res.stdout):
        if m.group(1):
            out.add(int(m.group(1)))
        else:
            out.update(range(int(m.group(2)), int(m.group(3))))
    return np.array(sorted(out), np.int64)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_repair_corpus(pristine: list[Pristine], tmp_path: Path, i: int,
                       capsys: pytest.CaptureFixture[str]) -> None:
    p = pristine[i]
    n = p.nr_blocks
    sets0, eras0 = _dump(p.meta)
    src = p.meta.read_bytes()
    mid = p.eras[1]
    ws = p.blocks[f"ws{mid}"]
    k = len(ws) // 2
    ea = p.blocks["era-array"]
    j = len(ea) // 2
    # name -> (block to zero or byte to flip, {era: lost bit range}, lost era-array range,
    #          writesets lost whole)
    damages: dict[str, tuple[int, dict[int, range], range, bool]] = {
        "sb-csum": (-100, {}, range(0), False),
        "writeset-block": (ws[k], {mid: range(k * PER8 * 64, min(n, (k + 1) * PER8 * 64))},
                           range(0), False),
        "era-array-block": (ea[j], {}, range(j * PER4, min(n, (j + 1) * PER4)), False),
        "writeset-tree": (p.blocks["tree-root"][0], {}, range(0), True),
        "space-map": (p.blocks["sm"][0], {}, range(0), False),
    }
    era_repair_recovered = []
    for name, (where, lost_bits, lost_eras, tree_lost) in damages.items():
        buf = bytearray(src)
        if where < 0:
            buf[-where] ^= 1
        else:
            buf[where * BS:(where + 1) * BS] = bytes(BS)
        bad, ours, theirs = (tmp_path / f"{name}.{x}" for x in ("bad", "ours", "theirs"))
        bad.write_bytes(bytes(buf))
        oracles.make_sparse(ours, 2048)
        oracles.make_sparse(theirs, 2048)
        rc = main(["era", "repair", "-i", str(bad), "-o", str(ours)])
        err = capsys.readouterr().err
        assert rc == 0, f"{name}: {err}"
        assert bad.read_bytes() == bytes(buf)
        assert ("lost:" in err) == (name != "space-map"), (name, err)
        assert tool("era_check", str(ours)).returncode == 0, name
        assert main(["era", "check", "-q", str(ours)]) == 0, name
        sets, eras = _dump(ours)
        want_eras = eras0.copy()
        want_eras[lost_eras.start:lost_eras.stop] = p.current
        assert np.array_equal(eras, want_eras), name
        if tree_lost:  # the current era stands for every lost writeset: all written
            assert list(sets) == [p.current] and sets[p.current].all(), name
        else:
            assert sorted(sets) == sorted(sets0), name
            for era, bits in sets.items():
                want = sets0[era].copy()
                r = lost_bits.get(era, range(0))
                want[r.start:r.stop] = True
                assert np.array_equal(bits, want), f"{name}: writeset of era {era}"
        for since in range(0, p.current + 2):
            got, before = _invalidate(ours, since), _invalidate(p.meta, since)
            assert np.isin(before, got).all(), f"{name}: --written-since {since} lost blocks"
            if not lost_bits and not len(lost_eras) and not tree_lost:
                assert np.array_equal(got, before), f"{name}: --written-since {since}"
        if tool("era_repair", "-i", str(bad), "-o", str(theirs)).returncode == 0:
            era_repair_recovered.append(name)
            # ours is the pristine content (asserted above); 1.1's may not be (seen: bits of
            # era 6 set that the pristine writeset does not hold), so only its shape is held
            # against ours
            tsets, teras = _dump(theirs)
            assert sorted(tsets) == sorted(sets) and len(teras) == len(eras), name
    # 1.1 recovers only a damaged space map; it fails even on the pristine metadata
    assert tool("era_repair", "-i", str(p.meta), "-o", str(tmp_path / "theirs")).returncode != 0
    assert era_repair_recovered == ["space-map"]


def test_repair_refusals(pristine: list[Pristine], tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    p = pristine[0]
    bad, out = tmp_path / "bad", tmp_path / "out"
    buf = bytearray(p.meta.read_bytes())
    buf[:BS] = bytes(BS)
    bad.write_bytes(bytes(buf))
    out.write_bytes(b"x" * BS * 8)
    assert main(["era", "repair", "-i", str(bad), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "superblock" in err
    assert out.read_bytes() == b"x" * BS * 8
    assert main(["era", "repair", "-i", str(p.meta), "-o", str(p.meta)]) == 2
    assert "same file" in capsys.readouterr().err


def test_random_damage_repairs_or_refuses(pristine: list[Pristine], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Random damage (a used block zeroed, a random byte flipped, the file cut short): repair
    exits 0 with an output both checkers pass, or 1 (superblock unusable) with one line;
    never a traceback."""
    rng = random.Random(3131)
    out = tmp_path / "out"
    for p in pristine:
        src = p.meta.read_bytes()
        used = max(b for blocks in p.blocks.values() for b in blocks) + 1
        for k in range(20):
            buf = bytearray(src)
            kind = k % 3
            if kind == 0:
                buf[(b := rng.randrange(used)) * BS:(b + 1) * BS] = bytes(BS)
            elif kind == 1:
                buf[rng.randrange(used * BS)] ^= 1 << rng.randrange(8)
            else:
                del buf[rng.randrange(1, used) * BS:]
            bad = tmp_path / "bad"
            bad.write_bytes(bytes(buf))
            oracles.make_sparse(out, 2048)
            rc = main(["era", "repair", "-q", "-i", str(bad), "-o", str(out)])
            err = capsys.readouterr().err
            assert "Traceback" not in err
            if rc == 0:
                assert tool("era_check", str(out)).returncode == 0, (p.meta.name, k)
                assert main(["era", "check", "-q", str(out)]) == 0, (p.meta.name, k)
            else:
                assert rc == 1 and len(err.strip().splitlines()) == 1, (k, err)
