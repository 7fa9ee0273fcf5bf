"""dm-era metadata against thin-provisioning-tools 1.1: metadata written by era_restore 1.1
from seeded random XML (many array blocks, several archived writesets); `era dump` (plain and
--logical) and `era invalidate` must be byte-identical to era_dump / era_invalidate 1.1 and
`era check` must give era_check 1.1's verdict, pristine and damaged.

The kernel's own era metadata is read in vmtests/test_era_guest.py."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import restore_xml
from meta_compare import differing_blocks
from sparse import write_sparse

from dmimage.cli.main import main
from dmimage.format.era import ERA_SUPERBLOCK, EraSuperblock

import oracles
from cli_run import run_cli

TOOLS = oracles.tools_11()




CASES = [(100, [4, 5], 5), (3000, [10, 11, 12], 12), (40_000, [7], 7), (64, [], 3),
         (20_000, [20, 21, 22, 23], 23)]


def run11(tool: str, *argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(TOOLS.bindir / tool), *argv], capture_output=True, timeout=300)


def ours(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """`dmimage era ARGS`, in-process (tests/cli_run.py)."""
    return run_cli("era", *argv)


def ours_process(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """`dmimage era ARGS` as its own process (the console script's start-up and exit)."""
    return subprocess.run([sys.executable, "-m", "dmimage", "era", *argv],
                          capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def metas(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("era")
    rng = random.Random(5)
    out = []
    for i, (n, eras, cur) in enumerate(CASES):
        src, meta = tmp / f"e{i}.xml", tmp / f"e{i}.meta"
        src.write_text(restore_xml.era_xml(rng, n, eras, cur))
        with open(meta, "wb") as f:
            f.truncate(16 << 20)
        subprocess.run([str(TOOLS.bindir / "era_restore"), "-i", str(src), "-o", str(meta)],
                       check=True, capture_output=True)
        out.append(meta)
    return out


def test_layout_twins_agree() -> None:
    raw = EraSuperblock.build(dict(csum=1, flags=2, blocknr=3, uuid=bytes(16), magic=4,
                                   version=5, metadata_space_map_root=bytes(128),
                                   data_block_size=6, metadata_block_size=7, nr_blocks=8,
                                   current_era=9, current_writeset_nr_bits=10,
                                   current_writeset_root=11, writeset_tree_root=12,
                                   era_array_root=13, metadata_snap=14))
    assert ERA_SUPERBLOCK.unpack(raw)[9:] == (8, 9, 10, 11, 12, 13, 14)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_dump_invalidate_identical(metas: list[Path], i: int) -> None:
    meta = metas[i]
    for extra in ([], ["--logical"]):
        want = run11("era_dump", *extra, str(meta))
        assert want.returncode == 0
        got = ours("dump", *extra, str(meta))
        assert got.returncode == 0, got.stderr
        assert got.stdout == want.stdout, extra
        if i == 0:  # once as a process of its own: the same output
            assert ours_process("dump", *extra, str(meta)).stdout == got.stdout
    _, eras, cur = CASES[i]
    for since in sorted({0, cur, cur + 1, *eras, max(cur - 2, 0)}):
        want = run11("era_invalidate", "--written-since", str(since), str(meta))
        got = ours("invalidate", "--written-since", str(since), str(meta))
        if eras:
            assert got.stdout == want.stdout, since
        else:
            # nothing archived: 1.1 lists nothing, dmimage the era array's blocks >= since
            assert want.stdout == b"<blocks>\n</blocks>"
            dumped = run11("era_dump", str(meta)).stdout.decode()
            truth = {int(b) for b, e in re.findall(r'<era block="(\d+)" era="(\d+)"/>', dumped)
                     if int(e) >= since}
            listed = set()
            for a, b, c in re.findall(r'<block block="(\d+)"/>|<range begin="(\d+)" '
                                      r'end="(\d+)"/>', got.stdout.decode()):
                listed |= {int(a)} if a else set(range(int(b), int(c)))
            assert listed == truth, since
    assert run11("era_check", str(meta)).returncode == 0
    assert ours("check", str(meta)).returncode == 0


def test_damaged_verdicts_agree(metas: list[Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(9)
    disagreements = []
    for meta in metas:
        blocks = np.frombuffer(meta.read_bytes(), np.uint8).reshape(-1, 4096)
        used = np.flatnonzero(blocks.any(axis=1))
        for k in range(8):
            buf = bytearray(meta.read_bytes())
            b = int(rng.choice(used))
            if rng.random() < 0.5:
                buf[b * 4096:(b + 1) * 4096] = bytes(4096)
                what = f"zeroed block {b}"
            else:
                off = b * 4096 + rng.randrange(4096)
                buf[off] ^= 1 << rng.randrange(8)
                what = f"bit flip at byte {off}"
            dst = tmp_path / f"{meta.stem}-{k}"
            write_sparse(dst, buf)
            t = run11("era_check", str(dst)).returncode != 0
            rc = main(["era", "check", "-q", str(dst)])
            err = capsys.readouterr().err
            assert rc in (0, 1, 2) and "Traceback" not in err
            if (rc != 0) != t:
                disagreements.append(f"{meta.stem} {what}: 1.1 {'fails' if t else 'passes'}, "
                                     f"dmimage exit {rc} {err.strip()}")
    assert not disagreements, "\n".join(disagreements)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_restore_round_trip(metas: list[Path], tmp_path: Path, i: int) -> None:
    """era_dump 1.1's XML restored by dmimage: era_check 1.1 passes and era_dump 1.1 gives
    the same XML back (plain and logical)."""
    xml = tmp_path / "in.xml"
    xml.write_bytes(run11("era_dump", str(metas[i])).stdout)
    out = tmp_path / "ours.meta"
    with open(out, "wb") as f:
        f.truncate(16 << 20)
    res = ours("restore", "-i", str(xml), "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert run11("era_check", str(out)).returncode == 0
    assert run11("era_dump", str(out)).stdout == xml.read_bytes()
    assert run11("era_dump", "--logical", str(out)).stdout == \
        run11("era_dump", "--logical", str(metas[i])).stdout


def test_restore_marked_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "in.xml", tmp_path / "out.meta"
    src.write_text('<superblock uuid="" block_size="128" nr_blocks="100" current_era="3">'
                   '<writeset era="3" nr_bits="100"><marked block_begin="10" len="5"/>'
                   '</writeset><era_array><era block="1" era="2"/></era_array></superblock>')
    with open(out, "wb") as f:
        f.truncate(1 << 20)
    assert main(["era", "restore", "-i", str(src), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["era", "invalidate", "--written-since", "3", str(out)]) == 0
    assert capsys.readouterr().out == '<blocks>\n  <range begin="10" end="15"/>\n</blocks>'
    src.write_text('<superblock uuid="" block_size="128" nr_blocks="100" current_era="3">'
                   '<writeset era="3" nr_bits="100"><marked block_begin="99" len="5"/>'
                   '</writeset></superblock>')
    out.write_bytes(b"\xaa" * (1 << 20))
    rc = main(["era", "restore", "-i", str(src), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "outside the writeset's 100 bits" in err
    assert out.read_bytes() == b"\xaa" * (1 << 20)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_restore_places_blocks_as_1_1(metas: list[Path], tmp_path: Path, i: int) -> None:
    """`era restore` of era_dump 1.1's XML writes era_restore 1.1's metadata block for block
    (same blocks, same places, same contents) but checksums and the unused tails of array
    blocks and btree nodes, where 1.1 leaves whatever its buffers held."""
    xml, theirs_meta, ours_meta = (tmp_path / n for n in ("in.xml", "theirs", "ours"))
    res = run11("era_dump", str(metas[i]))
    assert res.returncode == 0
    xml.write_bytes(res.stdout)
    for m in (theirs_meta, ours_meta):
        with open(m, "wb") as f:
            f.truncate(16 << 20)
    assert run11("era_restore", "-i", str(xml), "-o", str(theirs_meta)).returncode == 0
    assert main(["era", "restore", "-i", str(xml), "-o", str(ours_meta)]) == 0
    differ = differing_blocks(theirs_meta.read_bytes(), ours_meta.read_bytes())
    assert not differ, f"blocks {differ[:10]} differ"
