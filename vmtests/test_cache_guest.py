"""dm-cache: the kernel writes the metadata (smq, writeback mode, dirty blocks), dmimage reads
it exactly, and an offline writeback leaves the origin alone serving what the cached device
served.

Oracles: the guest's `dmsetup status` (used metadata blocks, used cache blocks, dirty
blocks), cache_dump and cache_check 1.1 on the same metadata, the guest's sha256 of the
cached device (also after `cache writeback`, which leaves the kernel no dirty block).
`cache repair`: of the kernel's metadata, damaged, offline; of restored metadata, damaged,
served by the kernel."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dmimage.guest.machine import Machine
from vmtests.kept_disks import KeptDisks, kept_disks, parametrize_kernel

import oracles
from cli_run import run_cli

pytestmark = pytest.mark.vm

BLOCK = 128  # sectors: 64 KiB cache blocks

#: Each kernel's guest keeps these disks for the whole module (vmtests/kept_disks.py: a
#: hot-plug and unplug of three disks costs ~1 QEMU CPU-s): metadata, fast and origin for
#: test_kernel_cache_metadata, then the same for the restored and repaired caches.
kept_sets, kept = kept_disks([8 << 20, 16 << 20, 64 << 20, 4 << 20, 8 << 20, 32 << 20])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize_kernel(metafunc)


def _dmimage(*argv: str) -> subprocess.CompletedProcess[str]:
    """Ours in this process (vmtests/scenario.py: no Python start-up per command)."""
    res = run_cli(*argv)
    return subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(),
                                       res.stderr.decode())


def _remove(vm: Machine, name: str) -> None:
    """Remove dm device *name* and check the kernel log, in one guest command (a sync too:
    the test's host side reads the disks next)."""
    out = vm.sh(f"set -e; dmsetup remove {name}; sync; echo @@dmesg@@\n"
                f"{vm.dmesg_since_command()}")
    vm.check_dmesg(log=out.partition("@@dmesg@@\n")[2])


@pytest.mark.parametrize("version", [1, 2])
def test_kernel_cache_metadata(kept: KeptDisks, tmp_path: Path, version: int) -> None:
    tools = oracles.tools_11()
    meta, fast, origin = kept.files[:3]
    kept.zero()
    origin.write_bytes(np.random.default_rng(version).integers(
        0, 256, 64 << 20, dtype=np.uint8).tobytes())
    sectors = (64 << 20) // 512
    feature = "metadata2 writeback" if version == 2 else "writeback"
    nfeat = len(feature.split())
    table = (f"0 {sectors} cache {{m}} {{c}} {{o}} {BLOCK} {nfeat} {feature} smq 0")
    vm = kept.vm
    # Both activations on the kept disks; in between the host reads and rewrites their files
    # (vmtests/kept_disks.py: why the guest cannot serve stale bytes).
    m, c, o = kept.paths[:3]
    t = table.format(m=m, c=c, o=o)
    vm.sh(f"{kept.flush}dmsetup create kcache --table {shlex.quote(t)}")
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
        # suspend and resume commit the metadata
        fields = vm.sh("dmsetup suspend kcache && dmsetup resume kcache && "
                       "dmsetup status kcache").split()
    finally:
        _remove(vm, "kcache")
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
    res_dump = run_cli("cache", "dump", str(meta))
    assert res_dump.returncode == 0, res_dump.stderr
    ours = res_dump.stdout
    assert ours == theirs

    # the kernel's metadata damaged (superblock checksum, hint array, v2's dirty bitset):
    # cache_repair 1.1 refuses it; `cache repair` keeps every mapping, hints zero, lost dirty
    # bits dirty, and 1.1's checker and dumper accept the result
    bad, fixed = _damage_for_repair(meta, version), tmp_path / "fixed"
    with open(fixed, "wb") as f:
        f.truncate(8 << 20)
    assert subprocess.run([str(tools.bindir / "cache_repair"), "-i", str(bad), "-o",
                           str(fixed)], capture_output=True).returncode != 0
    res = _dmimage("cache", "repair", "-i", str(bad), "-o", str(fixed))
    assert res.returncode == 0, res.stdout + res.stderr
    assert subprocess.run([str(tools.bindir / "cache_check"), str(fixed)],
                          capture_output=True).returncode == 0
    want_fixed = re.sub(rb'data="[^"]*"', b'data="AAAAAA=="', theirs)
    if version == 2:
        want_fixed = want_fixed.replace(b'dirty="false"', b'dirty="true"')
    assert subprocess.run([str(tools.bindir / "cache_dump"), str(fixed)], capture_output=True,
                          check=True).stdout == want_fixed

    assert hashlib.sha256(origin.read_bytes()).hexdigest() != want_sha
    res = _dmimage("cache", "writeback", str(meta), str(fast), str(origin))
    assert res.returncode == 0, res.stderr
    assert f"copied {dirty_status} dirty blocks" in res.stdout
    assert "dirty bits cleared" in res.stdout
    assert hashlib.sha256(origin.read_bytes()).hexdigest() == want_sha
    # writeback cleared the dirty bits: the kernel, given the cache again, finds none dirty
    # and serves the same content
    again = vm.sh(f"{kept.flush}dmsetup create kcache --table {shlex.quote(t)} && "
                  "dmsetup status kcache").split()
    try:
        again_sha = vm.sha256_of("/dev/mapper/kcache")
    finally:
        _remove(vm, "kcache")
    assert int(again[13]) == 0 and int(again[6].split("/")[0]) == cache_used, again
    assert again_sha == want_sha


NR_CACHE, NR_ORIGIN = 128, 512


def _restore_inputs(kept: KeptDisks, tmp_path: Path, seed: int) -> tuple[Path, str]:
    """40 mappings (every other one dirty) of random cache blocks onto random origin blocks,
    the fast and origin disks filled with random bytes: (the cache_restore XML, the sha256
    the cached device must serve: the origin with the mapped blocks' cache content)."""
    bs = BLOCK * 512
    rng = np.random.default_rng(seed)
    fast_bytes = rng.integers(0, 256, NR_CACHE * bs, dtype=np.uint8).tobytes()
    origin_bytes = rng.integers(0, 256, NR_ORIGIN * bs, dtype=np.uint8).tobytes()
    cblocks = rng.choice(NR_CACHE, 40, replace=False)
    oblocks = rng.choice(NR_ORIGIN, 40, replace=False)
    lines = [f'<superblock uuid="" block_size="{BLOCK}" nr_cache_blocks="{NR_CACHE}" '
             'policy="smq" hint_width="4">', "  <mappings>"]
    for c, o, k in sorted(zip(cblocks.tolist(), oblocks.tolist(), range(40), strict=True)):
        lines.append(f'    <mapping cache_block="{c}" origin_block="{o}" '
                     f'dirty="{"true" if k % 2 else "false"}"/>')
    lines += ["  </mappings>", "  <hints>", "  </hints>", "</superblock>"]
    xml = tmp_path / "in.xml"
    xml.write_text("\n".join(lines))
    _meta, fast, origin = kept.files[3:]
    kept.zero()
    fast.write_bytes(fast_bytes)
    origin.write_bytes(origin_bytes)
    view = bytearray(origin_bytes)
    for c, o in zip(cblocks.tolist(), oblocks.tolist(), strict=True):
        view[o * bs:(o + 1) * bs] = fast_bytes[c * bs:(c + 1) * bs]
    return xml, hashlib.sha256(view).hexdigest()


def _serve_and_write(kept: KeptDisks, version: int, name: str) -> tuple[list[str], str]:
    """The kept disks as a writeback cache (smq, no migrations: the loaded dirty set stays as
    the kernel read it): (its status fields, the sha256 it serves); then 30 blocks written
    through it, and it is removed."""
    feature = "metadata2 writeback" if version == 2 else "writeback"
    vm = kept.vm
    m, c, o = kept.paths[3:]
    t = (f"0 {NR_ORIGIN * BLOCK} cache {m} {c} {o} "
         f"{BLOCK} {len(feature.split())} {feature} smq 2 migration_threshold 0")
    fields = vm.sh(f"{kept.flush}dmsetup create {name} --table {shlex.quote(t)} && "
                   f"dmsetup status {name}").split()
    try:
        got = vm.sha256_of(f"/dev/mapper/{name}")
        vm.sh(f"dd if=/dev/urandom of=/dev/mapper/{name} bs=64k seek=7 count=30 conv=fsync "
              "status=none")
    finally:
        _remove(vm, name)
    return fields, got


def _both_checkers_pass(meta: Path) -> None:
    tools = oracles.tools_11()
    assert subprocess.run([str(tools.bindir / "cache_check"), str(meta)],
                          capture_output=True).returncode == 0
    assert _dmimage("cache", "check", str(meta)).returncode == 0


@pytest.mark.parametrize("version", [1, 2])
def test_kernel_serves_restored_cache(kept: KeptDisks, tmp_path: Path, version: int) -> None:
    """`cache restore` metadata mapping origin blocks to cache blocks whose content differs
    from the origin: the kernel takes it and serves the cache blocks' content (dirty and clean
    alike), carries on writing, and leaves metadata both checkers pass."""
    xml, want = _restore_inputs(kept, tmp_path, 10 + version)
    meta = kept.files[3]
    res = _dmimage("cache", "restore", "-i", str(xml), "-o", str(meta), "--metadata-version",
                   str(version))
    assert res.returncode == 0, res.stderr
    fields, got = _serve_and_write(kept, version, "rcache")
    assert int(fields[6].split("/")[0]) == 40 and int(fields[13]) == 20
    assert got == want
    _both_checkers_pass(meta)


def _damage_for_repair(meta: Path, version: int) -> Path:
    """A copy of ``meta`` with a bad superblock checksum, its hint array lost and, in version
    2, its dirty bitset lost: damage cache_repair 1.1 gives up on (the checksum) and that
    loses no mapping."""
    from dmimage.cache.metadata import parse_superblock
    from dmimage.pdata.block import BlockReader

    with BlockReader(str(meta)) as r:
        sb = parse_superblock(r.block(0))
    buf = bytearray(meta.read_bytes())
    buf[100] ^= 1  # inside the space-map root, which repair rebuilds
    lost = [sb.hint_root] + ([sb.dirty_root] if version == 2 else [])
    for b in lost:
        buf[b * 4096:(b + 1) * 4096] = bytes(4096)
    bad = meta.with_name(meta.name + ".bad")
    bad.write_bytes(bytes(buf))
    return bad


@pytest.mark.parametrize("version", [1, 2])
def test_kernel_serves_repaired_cache(kept: KeptDisks, tmp_path: Path, version: int) -> None:
    """`cache restore` metadata (40 mappings, 20 dirty) damaged (superblock checksum, hint
    array, version 2's dirty bitset), repaired by `cache repair` (cache_repair 1.1 refuses
    it): the kernel takes the repair, serves the cache blocks' content at the mapped origin
    blocks, with every lost dirty bit dirty, and leaves metadata both checkers pass."""
    tools = oracles.tools_11()
    xml, want = _restore_inputs(kept, tmp_path, 20 + version)
    meta = kept.files[3]
    pristine = tmp_path / "pristine"
    with open(pristine, "wb") as f:
        f.truncate(4 << 20)
    res = _dmimage("cache", "restore", "-i", str(xml), "-o", str(pristine),
                   "--metadata-version", str(version))
    assert res.returncode == 0, res.stderr
    bad = _damage_for_repair(pristine, version)
    assert subprocess.run([str(tools.bindir / "cache_repair"), "-i", str(bad), "-o",
                           str(meta)], capture_output=True).returncode != 0
    res = _dmimage("cache", "repair", "-i", str(bad), "-o", str(meta))
    assert res.returncode == 0 and "lost: block 0, superblock: bad checksum" in res.stderr, \
        res.stdout + res.stderr
    want_dirty = 40 if version == 2 else 20
    assert f"40 mappings, {want_dirty} dirty" in res.stdout
    fields, got = _serve_and_write(kept, version, "pcache")
    assert int(fields[6].split("/")[0]) == 40 and int(fields[13]) == want_dirty, fields
    assert got == want
    _both_checkers_pass(meta)
