"""dm-cache: the kernel writes the metadata (smq, writeback mode, dirty blocks), dmimage reads
it exactly, and an offline writeback leaves the origin alone serving what the cached device
served.

Oracles: the guest's `dmsetup status` (used metadata blocks, used cache blocks, dirty
blocks), cache_dump and cache_check 1.1 on the same metadata, the guest's sha256 of the
cached device."""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmimage.guest.machine import Machine

import oracles

pytestmark = pytest.mark.vm

BLOCK = 128  # sectors: 64 KiB cache blocks


def _dmimage(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmimage", *argv], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("version", [1, 2])
def test_kernel_cache_metadata(dm_vm: Machine, tmp_path: Path, version: int) -> None:
    tools = oracles.tools_11()
    meta, fast, origin = tmp_path / "meta", tmp_path / "fast", tmp_path / "origin"
    for p, size in ((meta, 8 << 20), (fast, 16 << 20)):
        with open(p, "wb") as f:
            f.truncate(size)
    origin.write_bytes(np.random.default_rng(version).integers(
        0, 256, 64 << 20, dtype=np.uint8).tobytes())
    sectors = (64 << 20) // 512
    feature = "metadata2 writeback" if version == 2 else "writeback"
    nfeat = len(feature.split())
    table = (f"0 {sectors} cache {{m}} {{c}} {{o}} {BLOCK} {nfeat} {feature} smq 0")
    vm = dm_vm
    with vm.disk(meta, read_only=False) as m, vm.disk(fast, read_only=False) as c, \
            vm.disk(origin, read_only=False) as o:
        t = table.format(m=m.guest_path, c=c.guest_path, o=o.guest_path)
        vm.sh(f"dmsetup create kcache --table {shlex.quote(t)}")
        try:
            # rewrites and rereads get blocks promoted; then, with migrations stopped (no
            # background writeback either), rewrites of the cached blocks leave them dirty
            # smq's hotspot queues move on the cache's once-a-second tick: give it a few
            # (without the sleeps the CI run saw no promotion at all)
            vm.sh("for i in 1 2 3 4 5; do "
                  "dd if=/dev/urandom of=/dev/mapper/kcache bs=64k seek=10 count=40 conv=fsync "
                  "status=none; dd if=/dev/mapper/kcache of=/dev/null bs=64k skip=10 count=40 "
                  "status=none; dd if=/dev/mapper/kcache of=/dev/null bs=64k skip=300 count=20 "
                  "status=none; sleep 1.2; done; dmsetup message kcache 0 migration_threshold 0; "
                  "dd if=/dev/urandom of=/dev/mapper/kcache bs=64k seek=10 count=40 conv=fsync "
                  "status=none", timeout=300)
            want_sha = vm.sha256_of("/dev/mapper/kcache")
            vm.sh("dmsetup suspend kcache && dmsetup resume kcache")  # commit the metadata
            fields = vm.sh("dmsetup status kcache").split()
        finally:
            vm.sh("dmsetup remove kcache")
    vm.check_dmesg()
    meta_used, meta_total = map(int, fields[4].split("/"))
    cache_used, _ = map(int, fields[6].split("/"))
    dirty_status = int(fields[13])
    assert cache_used > 0 and dirty_status > 0, fields  # the scenario must leave dirty blocks

    res = _dmimage("cache", "check", str(meta), "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads(res.stdout)
    assert rep["version"] == version and rep["mappings"] == cache_used
    assert rep["metadata_used"] == meta_used and rep["metadata_total"] == meta_total
    # status was taken before teardown; the final commit writes the same dirty set back
    assert rep["dirty"] == dirty_status
    assert subprocess.run([str(tools.bindir / "cache_check"), str(meta)],
                          capture_output=True).returncode == 0
    theirs = subprocess.run([str(tools.bindir / "cache_dump"), str(meta)], capture_output=True,
                            check=True).stdout
    ours = subprocess.run([sys.executable, "-m", "dmimage", "cache", "dump", str(meta)],
                          capture_output=True, check=True).stdout
    assert ours == theirs

    assert hashlib.sha256(origin.read_bytes()).hexdigest() != want_sha
    res = _dmimage("cache", "writeback", str(meta), str(fast), str(origin))
    assert res.returncode == 0, res.stderr
    assert f"copied {dirty_status} dirty blocks" in res.stdout
    assert hashlib.sha256(origin.read_bytes()).hexdigest() == want_sha


@pytest.mark.parametrize("version", [1, 2])
def test_kernel_serves_restored_cache(dm_vm: Machine, tmp_path: Path, version: int) -> None:
    """`cache restore` metadata mapping origin blocks to cache blocks whose content differs
    from the origin: the kernel takes it and serves the cache blocks' content (dirty and clean
    alike), carries on writing, and leaves metadata both checkers pass."""
    tools = oracles.tools_11()
    bs = BLOCK * 512
    nr_cache, nr_origin = 128, 512
    rng = np.random.default_rng(10 + version)
    fast_bytes = rng.integers(0, 256, nr_cache * bs, dtype=np.uint8).tobytes()
    origin_bytes = rng.integers(0, 256, nr_origin * bs, dtype=np.uint8).tobytes()
    cblocks = rng.choice(nr_cache, 40, replace=False)
    oblocks = rng.choice(nr_origin, 40, replace=False)
    lines = [f'<superblock uuid="" block_size="{BLOCK}" nr_cache_blocks="{nr_cache}" '
             'policy="smq" hint_width="4">', "  <mappings>"]
    for c, o, k in sorted(zip(cblocks.tolist(), oblocks.tolist(), range(40), strict=True)):
        lines.append(f'    <mapping cache_block="{c}" origin_block="{o}" '
                     f'dirty="{"true" if k % 2 else "false"}"/>')
    lines += ["  </mappings>", "  <hints>", "  </hints>", "</superblock>"]
    xml = tmp_path / "in.xml"
    xml.write_text("\n".join(lines))
    meta, fast, origin = tmp_path / "meta", tmp_path / "fast", tmp_path / "origin"
    with open(meta, "wb") as f:
        f.truncate(4 << 20)
    fast.write_bytes(fast_bytes)
    origin.write_bytes(origin_bytes)
    res = _dmimage("cache", "restore", "-i", str(xml), "-o", str(meta), "--metadata-version",
                   str(version))
    assert res.returncode == 0, res.stderr
    view = bytearray(origin_bytes)
    for c, o in zip(cblocks.tolist(), oblocks.tolist(), strict=True):
        view[o * bs:(o + 1) * bs] = fast_bytes[c * bs:(c + 1) * bs]
    want = hashlib.sha256(view).hexdigest()

    feature = "metadata2 writeback" if version == 2 else "writeback"
    vm = dm_vm
    with vm.disk(meta, read_only=False) as m, vm.disk(fast, read_only=False) as c, \
            vm.disk(origin, read_only=False) as o:
        t = (f"0 {nr_origin * BLOCK} cache {m.guest_path} {c.guest_path} {o.guest_path} "
             f"{BLOCK} {len(feature.split())} {feature} smq 2 migration_threshold 0")
        # no migrations: the restored dirty set stays as the kernel loaded it
        vm.sh(f"dmsetup create rcache --table {shlex.quote(t)}")
        try:
            fields = vm.sh("dmsetup status rcache").split()
            got = vm.sha256_of("/dev/mapper/rcache")
            vm.sh("dd if=/dev/urandom of=/dev/mapper/rcache bs=64k seek=7 count=30 conv=fsync "
                  "status=none")
        finally:
            vm.sh("dmsetup remove rcache")
    vm.check_dmesg()
    assert int(fields[6].split("/")[0]) == 40 and int(fields[13]) == 20
    assert got == want
    assert subprocess.run([str(tools.bindir / "cache_check"), str(meta)],
                          capture_output=True).returncode == 0
    assert _dmimage("cache", "check", str(meta)).returncode == 0
