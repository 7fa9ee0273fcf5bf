"""The largest metadata device (issue 11): a sparse 16 GiB metadata file, whose first
4,161,600 blocks (255 bitmaps of 16,320 blocks: all one index block can describe) hold the
pool. `metadata-size`, `format`, `restore` and `check` on it, side by side with
thin_metadata_size, thin_restore and thin_check 1.1 on the same kind of file. The files are
sparse (a few MiB really written) and removed at the end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dmimage import open_pool
from dmimage.format.constants import MAX_METADATA_BLOCKS

import oracles
import poolgen

GiB = 1 << 30


def _dm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmimage", *args], capture_output=True,
                          text=True, timeout=600)


def _sparse(path, size: int):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _free_blocks(out: str) -> int:
    line = next(x for x in out.splitlines() if x.startswith("METADATA_FREE_BLOCKS="))
    return int(line.split("=")[1])


@pytest.fixture
def big(tmp_path):
    paths = []

    def make(name: str):
        paths.append(_sparse(tmp_path / name, 16 * GiB))
        return paths[-1]

    yield make
    for p in paths:
        assert os.stat(p).st_blocks * 512 < 256 << 20, f"{p} is not sparse"
        p.unlink()


def test_metadata_size_of_a_huge_pool_is_the_maximum(tools11):
    args = ("-b", "64k", "-s", "1p", "-m", "1000", "-u", "s")
    want = oracles.metadata_size(tools11, *args).strip()
    got = _dm("metadata-size", *args)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == want
    assert int(want.split()[0]) == MAX_METADATA_BLOCKS * 8  # sectors: 15.87 GiB, under 16


def test_format_and_check_on_16gib(big, tools11):
    meta = big("fmt.meta")
    r = _dm("format", "--data-block-size", "128", "--nr-data-blocks", "1000000", str(meta))
    assert r.returncode == 0, r.stderr
    with open_pool(meta) as pool:
        assert pool.superblock.metadata_sm.nr_blocks == MAX_METADATA_BLOCKS
        assert pool.metadata_space_map().counts.shape == (MAX_METADATA_BLOCKS,)
    rc11, out11, err11 = oracles.check(meta, tools11)
    assert rc11 == 0, err11
    ours = _dm("check", str(meta))
    assert ours.returncode == 0, ours.stderr
    assert _free_blocks(ours.stdout) == _free_blocks(out11)


def test_restore_on_16gib_matches_thin_restore(big, tools11, tmp_path):
    xml = tmp_path / "pool.xml"
    xml.write_text(poolgen.to_xml(poolgen.multilevel_pool(20_000)))
    theirs, ours = big("t.meta"), big("o.meta")
    oracles.run(tools11, "thin_restore", "-q", "-i", xml, "-o", theirs, check=True)
    r = _dm("restore", "-q", "-i", str(xml), "-o", str(ours))
    assert r.returncode == 0, r.stderr
    for meta in (theirs, ours):
        rc, out, err = oracles.check(meta, tools11)
        assert rc == 0, (meta, err)
        c = _dm("check", str(meta))
        assert c.returncode == 0, c.stderr
        assert _free_blocks(c.stdout) == _free_blocks(out)
    assert oracles.dump(ours, tools11) == oracles.dump(theirs, tools11)
    with open_pool(ours) as a, open_pool(theirs) as b:
        assert a.superblock.metadata_sm == b.superblock.metadata_sm
        assert a.superblock.metadata_sm.nr_blocks == MAX_METADATA_BLOCKS
