"""dmimage trim: on a data file, provisioned blocks keep their content and every unprovisioned
block reads zero and is a hole; the result equals thin_trim 1.1's on a loop device over a
copy of the same file (byte for byte and hole for hole); --dry-run; refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_ls import run_ours

from dmimage.thin.pool import open_pool
from dmimage.thin.trim import trim_data, unprovisioned_ranges

import damage
import oracles
import poolgen

BS_SECTORS = 128
BS = BS_SECTORS * 512


def make_pool(restored_pool, seed: int, nr_data: int = 300):
    pool = poolgen.random_pool(seed, n_devices=3, max_mappings=60, nr_data_blocks=nr_data,
                               data_block_size=BS_SECTORS)
    return pool, restored_pool(pool)


def make_data(path: Path, nr_blocks: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    content = rng.integers(1, 256, nr_blocks * BS, dtype=np.uint8).tobytes()
    path.write_bytes(content)
    return content


def mapped_blocks(pool: poolgen.Pool) -> set[int]:
    return {int(x) for d in pool.devices for x in d.mappings[:, 1]}


def data_extents(path: Path) -> list[tuple[int, int]]:
    """(start, end) byte ranges holding data (SEEK_DATA/SEEK_HOLE)."""
    out = []
    size = path.stat().st_size
    with open(path, "rb") as f:
        fd = f.fileno()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_trim_file(seed, tmp_path, restored_pool):
    pool, rp = make_pool(restored_pool, seed)
    data = tmp_path / "data.img"
    before = make_data(data, pool.nr_data_blocks, seed)
    out = run_ours("trim", rp.path, data)
    assert out.endswith(b"blocks\n")
    after = data.read_bytes()
    assert len(after) == len(before)
    used = mapped_blocks(pool)
    for b in range(pool.nr_data_blocks):
        chunk = after[b * BS:(b + 1) * BS]
        if b in used:
            assert chunk == before[b * BS:(b + 1) * BS], b
        else:
            assert chunk == bytes(BS), b
    # Holes exactly where nothing is provisioned (filesystem extents, 64 KiB aligned).
    holes_ok = {b for b in range(pool.nr_data_blocks) if b in used}
    in_data = set()
    for s, e in data_extents(data):
        in_data.update(range(s // BS, -(-e // BS)))
    assert in_data == holes_ok
    # Idempotent, and a dry run lists the same ranges as the library.
    with open_pool(rp.path) as p:
        ranges = unprovisioned_ranges(p)
    assert sum(r.end - r.begin for r in ranges) == pool.nr_data_blocks - len(used)
    assert trim_data(rp.path, data, dry_run=True) == ranges
    dry = run_ours("trim", "--dry-run", rp.path, data)
    assert dry.count(b"would discard") == len(ranges)
    run_ours("trim", "-q", rp.path, data)
    assert data.read_bytes() == after


def _losetup() -> bool:
    if os.geteuid() != 0 or not shutil.which("losetup"):
        return False
    return Path("/dev/loop-control").exists()


@pytest.mark.skipif(not _losetup(), reason="needs root and loop devices")
@pytest.mark.parametrize("seed", [4, 5])
def test_same_as_thin_trim_on_loop_device(seed, tmp_path, restored_pool, tools11):
    pool, rp = make_pool(restored_pool, seed)
    ours_img, theirs_img = tmp_path / "ours.img", tmp_path / "theirs.img"
    make_data(ours_img, pool.nr_data_blocks, seed)
    shutil.copyfile(ours_img, theirs_img)
    try:
        loop = subprocess.run(["losetup", "-f", "--show", str(theirs_img)], check=True,
                              capture_output=True, text=True).stdout.strip()
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"losetup failed: {exc.stderr.strip()}")
    try:
        oracles.run(tools11, "thin_trim", "--metadata-dev", rp.path, "--data-dev", loop,
                    check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    # On a regular file thin_trim 1.1 fails (BLKDISCARD on a file); ours punches holes.
    p = oracles.run(tools11, "thin_trim", "--metadata-dev", rp.path, "--data-dev", ours_img)
    assert p.returncode != 0
    run_ours("trim", "--metadata-dev", rp.path, "--data-dev", ours_img)
    assert ours_img.read_bytes() == theirs_img.read_bytes()
    assert data_extents(ours_img) == data_extents(theirs_img)


def test_refusals(tmp_path, restored_pool, capsys):
    pool, rp = make_pool(restored_pool, 7)
    small = tmp_path / "small.img"
    small.write_bytes(bytes(BS))
    run_ours("trim", rp.path, small, rc=2)
    assert "wanted" in capsys.readouterr().err
    run_ours("trim", rp.path, rc=2)
    run_ours("trim", rp.path, tmp_path / "missing.img", rc=2)
    capsys.readouterr()
    # Damaged metadata: exit 1, one line, nothing touched.
    data = tmp_path / "data.img"
    before = make_data(data, pool.nr_data_blocks, 7)
    meta = bytes(rp.read())
    for i, dm in enumerate([damage.flip_byte(meta, "btree_leaf", role="bottom"),
                            damage.leaked_block(meta),
                            damage.flip_byte(meta, "superblock")]):
        p = tmp_path / f"d{i}.meta"
        p.write_bytes(bytes(dm.data))
        run_ours("trim", p, data, rc=1)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dmimage trim: "), (dm, err)
        assert data.read_bytes() == before
