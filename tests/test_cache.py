"""dm-cache metadata against thin-provisioning-tools 1.1: metadata written by cache_restore 1.1
from seeded random XML (versions 1 and 2, several array blocks, multi-level array btrees);
`dmimage cache dump` must be byte-identical to cache_dump 1.1 and `cache check` must give
cache_check 1.1's verdict, on the pristine metadata and on damaged copies.

The kernel's own cache metadata is read in vmtests/test_cache_guest.py."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import restore_xml

from dmimage.cli.main import main
from dmimage.format.cache import CACHE_SUPERBLOCK, CacheSuperblock

import oracles

TOOLS = oracles.tools_11()




def restore(tmp: Path, xml: str, version: int, name: str) -> Path:
    src, meta = tmp / f"{name}.xml", tmp / f"{name}.meta"
    src.write_text(xml)
    with open(meta, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run([str(TOOLS.bindir / "cache_restore"), "-i", str(src), "-o", str(meta),
                    "--metadata-version", str(version)], check=True, capture_output=True)
    return meta


def ours(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "dmimage", "cache", *argv],
                          capture_output=True, timeout=120)


def theirs(tool: str, *argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(TOOLS.bindir / tool), *argv], capture_output=True, timeout=120)


CASES = [(1, 64, 0.5), (2, 64, 0.5), (1, 5000, 0.3), (2, 5000, 0.9), (2, 140_000, 0.05),
         (1, 140_000, 0.02), (2, 1000, 0.0)]


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("cache")
    rng = random.Random(20261201)
    return [restore(tmp, restore_xml.cache_xml(rng, n, fill), v, f"c{i}")
            for i, (v, n, fill) in enumerate(CASES)]


def test_layout_twins_agree() -> None:
    fields = dict(csum=1, flags=2, blocknr=3, uuid=bytes(range(16)), magic=4, version=5,
                  policy_name=b"smq".ljust(16, b"\0"), policy_hint_size=6,
                  metadata_space_map_root=bytes(range(128)), mapping_root=7, hint_root=8,
                  discard_root=9, discard_block_size=10, discard_nr_blocks=11,
                  data_block_size=12, metadata_block_size=13, cache_blocks=14,
                  compat_flags=15, compat_ro_flags=16, incompat_flags=17, read_hits=18,
                  read_misses=19, write_hits=20, write_misses=21, policy_version=[22, 23, 24],
                  dirty_root=25)
    raw = CacheSuperblock.build(fields)
    assert CACHE_SUPERBLOCK.unpack(raw)[5] == 5 and CACHE_SUPERBLOCK.unpack(raw)[-1] == 25
    assert len(raw) == CACHE_SUPERBLOCK.size


@pytest.mark.parametrize("i", range(len(CASES)))
def test_dump_identical_and_check_clean(pools: list[Path], i: int) -> None:
    meta = pools[i]
    want = theirs("cache_dump", str(meta))
    assert want.returncode == 0
    got = ours("dump", str(meta))
    assert got.returncode == 0, got.stderr
    assert got.stdout == want.stdout
    assert theirs("cache_check", str(meta)).returncode == 0
    res = ours("check", str(meta))
    assert res.returncode == 0, res.stdout + res.stderr


def _damage(src: Path, dst: Path, rng: random.Random, used: int) -> str:
    buf = bytearray(src.read_bytes())
    b = rng.randrange(used)
    kind = rng.choice(["zero", "byte", "csum-ok-field"])
    if kind == "zero":
        buf[b * 4096:(b + 1) * 4096] = bytes(4096)
    else:
        off = b * 4096 + rng.randrange(4096)
        buf[off] ^= 1 << rng.randrange(8)
    dst.write_bytes(buf)
    return f"{kind} block {b}"


def test_damaged_verdicts_agree(pools: list[Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """Random single damages to used metadata blocks: the same exit status as cache_check 1.1
    (0 against non-0), except where dmimage is stricter for a rule the kernel also enforces
    (superblock magic and block number: 1.1 reads neither)."""
    rng = random.Random(7)
    disagreements = []
    for meta in pools[:5]:
        blocks = np.frombuffer(meta.read_bytes(), np.uint8).reshape(-1, 4096)
        used = int(np.flatnonzero(blocks.any(axis=1)).max()) + 1
        for k in range(12):
            dst = tmp_path / f"{meta.stem}-{k}"
            what = _damage(meta, dst, rng, used)
            t = theirs("cache_check", str(dst)).returncode != 0
            rc = main(["cache", "check", "-q", str(dst)])
            err = capsys.readouterr().err
            assert rc in (0, 1, 2) and "Traceback" not in err
            if (rc != 0) != t:
                disagreements.append(f"{meta.stem} {what}: 1.1 {'fails' if t else 'passes'}, "
                                     f"dmimage exit {rc} {err.strip()}")
    assert not disagreements, "\n".join(disagreements)


def test_writeback_copies_exactly_the_dirty_blocks(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A cache_restore 1.1 pool with a known dirty set: writeback copies those blocks (64 KiB
    each) from FAST to ORIGIN and nothing else; --dry-run counts without writing."""
    xml = ('<superblock uuid="" block_size="128" nr_cache_blocks="8" policy="smq" '
           'hint_width="4">\n  <mappings>\n'
           '    <mapping cache_block="0" origin_block="3" dirty="true"/>\n'
           '    <mapping cache_block="2" origin_block="1" dirty="false"/>\n'
           '    <mapping cache_block="5" origin_block="7" dirty="true"/>\n'
           '  </mappings>\n  <hints>\n  </hints>\n</superblock>')
    bs = 128 * 512
    for version in (1, 2):
        meta = restore(tmp_path, xml, version, f"wb{version}")
        fast, origin = tmp_path / "fast", tmp_path / "origin"
        fast_bytes = np.random.default_rng(1).integers(0, 256, 8 * bs, dtype=np.uint8).tobytes()
        org = np.random.default_rng(2).integers(0, 256, 10 * bs, dtype=np.uint8).tobytes()
        fast.write_bytes(fast_bytes)
        origin.write_bytes(org)
        assert main(["cache", "writeback", "--dry-run", str(meta), str(fast), str(origin)]) == 0
        assert "2 dirty blocks" in capsys.readouterr().out and origin.read_bytes() == org
        assert main(["cache", "writeback", str(meta), str(fast), str(origin)]) == 0
        want = bytearray(org)
        for c, o in ((0, 3), (5, 7)):
            want[o * bs:(o + 1) * bs] = fast_bytes[c * bs:(c + 1) * bs]
        assert origin.read_bytes() == bytes(want)
