"""dm-era: the kernel writes the metadata through eras and checkpoints; dmimage reads it exactly
(era_dump 1.1's bytes, plain and --logical) and `era invalidate --written-since E` lists
exactly the blocks the test wrote in eras >= E.

Oracles: the test's own record of which blocks it wrote in which era, the guest's `dmsetup
status` (current era), and era_dump / era_invalidate / era_check 1.1 on the same metadata."""

from __future__ import annotations

import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dmimage.guest.machine import Machine

import oracles

pytestmark = pytest.mark.vm

BLOCK = 128  # sectors: 64 KiB era blocks
NR_BLOCKS = 256


def _run(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(argv), capture_output=True, timeout=300)


def _blocks(xml: bytes) -> set[int]:
    out: set[int] = set()
    for m in re.finditer(rb'<block block="(\d+)"/>|<range begin="(\d+)" end="(\d+)"/>', xml):
        if m.group(1) is not None:
            out.add(int(m.group(1)))
        else:
            out.update(range(int(m.group(2)), int(m.group(3))))
    return out


def test_kernel_era_metadata(dm_vm: Machine, tmp_path: Path) -> None:
    tools = oracles.tools_11()
    meta, origin = tmp_path / "meta", tmp_path / "origin"
    for p, size in ((meta, 4 << 20), (origin, NR_BLOCKS * BLOCK * 512)):
        with open(p, "wb") as f:
            f.truncate(size)
    rng = random.Random(2026)
    written: dict[int, set[int]] = {}
    vm = dm_vm
    with vm.disk(meta, read_only=False) as m, vm.disk(origin, read_only=False) as o:
        t = f"0 {NR_BLOCKS * BLOCK} era {m.guest_path} {o.guest_path} {BLOCK}"
        vm.sh(f"dmsetup create kera --table {shlex.quote(t)}")
        try:
            for _ in range(4):
                era = int(vm.sh("dmsetup status kera").split()[5])
                blocks = set(rng.sample(range(NR_BLOCKS), rng.randrange(5, 40)))
                written.setdefault(era, set()).update(blocks)
                vm.sh("; ".join(f"dd if=/dev/urandom of=/dev/mapper/kera bs=64k seek={b} "
                                "count=1 conv=fsync status=none" for b in sorted(blocks)))
                vm.sh("dmsetup message kera 0 checkpoint")
            final_era = int(vm.sh("dmsetup status kera").split()[5])
        finally:
            vm.sh("dmsetup remove kera")
    vm.check_dmesg()

    assert _run(str(tools.bindir / "era_check"), str(meta)).returncode == 0
    res = _run(sys.executable, "-m", "dmimage", "era", "check", str(meta))
    assert res.returncode == 0, res.stdout + res.stderr
    for extra in ([], ["--logical"]):
        theirs = _run(str(tools.bindir / "era_dump"), *extra, str(meta))
        ours = _run(sys.executable, "-m", "dmimage", "era", "dump", *extra, str(meta))
        assert theirs.returncode == 0 and ours.stdout == theirs.stdout
    assert f'current_era="{final_era}"'.encode() in ours.stdout
    for since in sorted(written):
        want = set().union(*(b for e, b in written.items() if e >= since))
        ours = _run(sys.executable, "-m", "dmimage", "era", "invalidate", "--written-since",
                    str(since), str(meta))
        theirs = _run(str(tools.bindir / "era_invalidate"), "--written-since", str(since),
                      str(meta))
        assert ours.returncode == 0 and ours.stdout == theirs.stdout
        assert _blocks(ours.stdout) == want, since
