"""Refusals agree: metadata whose superblock the kernel will not open (bad checksum, bad magic,
wrong block number, an unknown incompat feature) fails pool activation in the guest and fails
`dmimage check` alike; the undamaged original activates.

thin_check (0.9 and 1.1) is stricter nowhere here and laxer in three cases: with a valid
checksum it accepts a wrong magic, a wrong block number and an unknown incompat flag, all of
which the kernel refuses (`sb_check`, `__check_incompat_features`). THIN_CHECK_11_REFUSES
records what 1.1 does, so a change shows up."""

from __future__ import annotations

import shlex
import struct
from pathlib import Path

import pytest

from dmimage.format.checksum import seal
from dmimage.format.constants import SALT_SUPERBLOCK
from dmimage.guest.machine import Machine
from dmimage.thin.check import check_metadata
from dmimage.thin.format_pool import format_pool
from vmtests.scenario import PoolFiles

import oracles
from cli_run import run_cli

pytestmark = pytest.mark.vm

# thin_disk_superblock offsets (dm-thin-metadata.c)
OFF_FLAGS, OFF_BLOCKNR, OFF_MAGIC, OFF_INCOMPAT = 4, 8, 32, 4 + 4 + 8 + 16 + 8 + 4 + 4 + 8 + 8 \
    + 128 + 128 + 8 + 8 + 4 + 4 + 8 + 4 + 4


def _damage(buf: bytearray, kind: str) -> str:
    """Damage block 0 in place; returns the kernel log text expected (dm-thin-metadata.c)."""
    if kind == "checksum":
        buf[OFF_MAGIC + 12] ^= 0x01  # the time field; the checksum is left stale
        return "sb_check failed: csum"
    if kind == "magic":
        struct.pack_into("<Q", buf, OFF_MAGIC, 27022011)
        seal(buf, SALT_SUPERBLOCK)
        return "sb_check failed: magic"
    if kind == "blocknr":
        struct.pack_into("<Q", buf, OFF_BLOCKNR, 1)
        seal(buf, SALT_SUPERBLOCK)
        return "sb_check failed: blocknr"
    if kind == "incompat":
        struct.pack_into("<I", buf, OFF_INCOMPAT, 1 << 7)
        seal(buf, SALT_SUPERBLOCK)
        return "unsupported optional features"
    raise ValueError(kind)


#: Observed: thin_check 1.1 exit status != 0 for these damages (the kernel refuses all four).
THIN_CHECK_11_REFUSES = {"checksum": True, "magic": False, "blocknr": False, "incompat": False}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> PoolFiles:
    d = tmp_path_factory.mktemp("refusals")
    f = PoolFiles(d / "good.meta", d / "good.data", 128, 64)
    with open(f.meta, "wb") as h:
        h.truncate(2 << 20)
    with open(f.data, "wb") as h:
        h.truncate(64 * 128 * 512)
    format_pool(f.meta, 128, 64)
    return f


def _activate(vm: Machine, meta: Path, data: Path) -> tuple[bool, str]:
    with vm.disks_attached([meta, data], read_only=False) as (m, d):
        table = f"0 {64 * 128} thin-pool {m.guest_path} {d.guest_path} 128 0"
        res = vm.run(f"dmsetup create refusal --table {shlex.quote(table)}")
        if res.ok:
            vm.sh("dmsetup status refusal && dmsetup remove refusal")
        log = vm.dmesg()
        return res.ok, log


def test_pristine_activates(dm_vm: Machine, pristine: PoolFiles) -> None:
    assert check_metadata(pristine.meta).ok()
    ok, _ = _activate(dm_vm, pristine.meta, pristine.data)
    assert ok


@pytest.mark.parametrize("kind", ["checksum", "magic", "blocknr", "incompat"])
def test_refused_alike(dm_vm: Machine, pristine: PoolFiles, tmp_path: Path, kind: str) -> None:
    meta = tmp_path / f"{kind}.meta"
    buf = bytearray(pristine.meta.read_bytes())
    blk = bytearray(buf[:4096])
    expect_log = _damage(blk, kind)
    buf[:4096] = blk
    meta.write_bytes(bytes(buf))
    # dmimage refuses: the library's report and the CLI's exit status.
    report = check_metadata(meta)
    assert not report.ok(), f"dmimage check accepted a superblock with bad {kind}"
    cli = run_cli("check", str(meta))  # the command line's entry point, in this process
    assert cli.returncode != 0, (cli.stdout + cli.stderr).decode()
    # thin_check 1.1, for the record (it is laxer than the kernel, see the module doc).
    try:
        rc, _out, _err = oracles.check(meta, oracles.tools_11())
        assert (rc != 0) == THIN_CHECK_11_REFUSES[kind], f"thin_check 1.1 exit {rc} on {kind}"
    except oracles.OracleUnavailable:
        pass
    # The kernel refuses to activate, saying why; nothing is left behind.
    before = len(dm_vm.dmesg().splitlines())
    ok, log = _activate(dm_vm, meta, pristine.data)
    assert not ok, f"the kernel activated a pool whose superblock has bad {kind}"
    new = "\n".join(log.splitlines()[before:])
    assert expect_log in new, new
    assert "No devices found" in dm_vm.sh("dmsetup ls")
    # The damaged metadata was not rewritten by the failed activation.
    assert meta.read_bytes()[:4096] == bytes(blk)
