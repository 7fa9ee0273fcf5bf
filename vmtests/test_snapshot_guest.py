"""dm-snapshot exception stores: the kernel writes them, dmimage reads them exactly; dmimage's
offline merge gives the origin the kernel's snapshot-merge gives it; stores the kernel
invalidates or refuses, dmimage flags.

Oracles: the guest's `dmsetup status` counters (sectors allocated, metadata sectors), the
sha256 of the snapshot device in the guest, and the kernel's own snapshot-merge target."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dmimage.guest.machine import Machine

pytestmark = pytest.mark.vm

CHUNK = 8  # sectors: 4 KiB chunks, 256 exceptions per metadata area
ORIGIN_MIB = 8
COW_MIB = 4


def _dmimage(*argv: str) -> subprocess.CompletedProcess[str]:
    """The command line's entry point in this process (a Python start-up per command costs
    ~1 s, more under load): exit code, stdout and stderr as a subprocess would give them."""
    import contextlib
    import io

    from dmimage.cli.main import main

    # Byte streams underneath, as a process has (the CLI writes some results to .buffer).
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8") for _ in range(2))
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    text = []
    for stream in (out, err):
        stream.flush()
        assert isinstance(stream.buffer, io.BytesIO)
        text.append(stream.buffer.getvalue().decode())
    return subprocess.CompletedProcess(["dmimage", *argv], rc, text[0], text[1])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _parse_status(line: str) -> tuple[int, int, int]:
    """(allocated, total, metadata) sectors from a snapshot's `dmsetup status`."""
    fields = line.split()
    alloc, total = fields[3].split("/")
    return int(alloc), int(total), int(fields[4])


def _remove(vm: Machine, names: str, allow: tuple[str, ...] = ()) -> None:
    """``dmsetup remove`` each of *names* in order, then check the kernel log: one guest
    command."""
    out = vm.sh("set -e; " + "; ".join(f"dmsetup remove {n}" for n in names.split()) +
                f"; echo @@dmesg@@; {vm.dmesg_since_command()}")
    vm.check_dmesg(allow=allow, log=out.partition("@@dmesg@@\n")[2])


def _stack(vm: Machine, origin: str, cow: str, writes: str) -> dict[str, object]:
    """base (linear) <- snapshot (persistent store on cow) and snapshot-origin; run ``writes``
    (shell, with $ORIG and $SNAP), record status and hashes, tear down."""
    # One guest command for the stack, the writes and the status (each command is a round
    # trip); the disks' page cache is dropped first, as the host may have rewritten them.
    try:
        status_line = vm.sh(
            f"set -e; blockdev --flushbufs {origin}; blockdev --flushbufs {cow}\n"
            f"size=$(blockdev --getsz {origin})\n"
            f"dmsetup create sbase --table \"0 $size linear {origin} 0\"\n"
            f"dmsetup create ssnap --table \"0 $size snapshot /dev/mapper/sbase {cow} P "
            f"{CHUNK}\"\n"
            "dmsetup create sorig --table \"0 $size snapshot-origin /dev/mapper/sbase\"\n"
            f"ORIG=/dev/mapper/sorig SNAP=/dev/mapper/ssnap; {writes}\n"
            "dmsetup status ssnap", timeout=300)
        rec: dict[str, object] = {"status_line": status_line.strip()}
        if "Invalid" not in status_line:
            rec["status"] = _parse_status(status_line)
            rec["snap_sha"], rec["orig_sha"] = vm.sha256_many(
                [("/dev/mapper/ssnap", None), ("/dev/mapper/sorig", None)])
        else:
            rec["orig_sha"] = vm.sha256_of("/dev/mapper/sorig")
    finally:
        _remove(vm, "sorig ssnap sbase", allow=("snapshot is invalidated",
                                               "Invalidating snapshot"))
    return rec


@pytest.fixture
def disks(tmp_path: Path) -> tuple[Path, Path]:
    origin, cow = tmp_path / "origin", tmp_path / "cow"
    origin.write_bytes(np.random.default_rng(11).integers(0, 256, ORIGIN_MIB << 20,
                                                           dtype=np.uint8).tobytes())
    with open(cow, "wb") as f:
        f.truncate(COW_MIB << 20)
    return origin, cow


# 300 origin chunks copied out (two full areas' worth crosses into a second area), writes to the
# snapshot (new chunks and a rewrite of an already excepted one), and sub-chunk writes.
WRITES = ("dd if=/dev/urandom of=$ORIG bs=4096 seek=100 count=300 conv=fsync status=none && "
          "dd if=/dev/urandom of=$SNAP bs=4096 seek=1000 count=20 conv=fsync status=none && "
          "dd if=/dev/urandom of=$SNAP bs=4096 seek=150 count=2 conv=fsync status=none && "
          "dd if=/dev/urandom of=$SNAP bs=512 seek=16001 count=3 conv=fsync status=none && "
          "dd if=/dev/urandom of=$ORIG bs=512 seek=12003 count=1 conv=fsync status=none")


def test_kernel_store_read_exactly_and_merged(dm_vm: Machine, tmp_path: Path,
                                              disks: tuple[Path, Path]) -> None:
    origin, cow = disks
    # Two disks for the whole test (each disk's hot-plug and unplug costs ~0.3 QEMU CPU-s);
    # the dm_vm guard detaches them when it ends. The host reads and rewrites their files
    # between the stacks: the guest cannot serve stale bytes, as dm targets read their devices
    # with bios, not through the disks' page cache (dropped anyway before each stack), and
    # QEMU reads its raw files through the host's page cache.
    o, c = (d.guest_path for d in dm_vm.attach_many([origin, cow], read_only=False))
    rec = _stack(dm_vm, o, c, WRITES)
    status = rec["status"]
    assert isinstance(status, tuple)
    alloc, total, meta = status
    assert _sha(origin) == rec["orig_sha"]

    res = _dmimage("snapshot", "check", str(cow), str(origin), "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads(res.stdout)
    # 300 + 20 + 1 (the 512-byte snapshot write's chunk) + 1 (the origin's) exceptions
    assert rep["exceptions"] == 322 and rep["areas"] == 2
    assert (rep["allocated_sectors"], rep["total_sectors"], rep["metadata_sectors"]) == \
        (alloc, total, meta)

    view = tmp_path / "view"
    res = _dmimage("snapshot", "export", str(cow), str(origin), "-o", str(view))
    assert res.returncode == 0, res.stderr
    assert _sha(view) == rec["snap_sha"]

    # The kernel's snapshot-merge on both disks, against dmimage's offline merge of copies.
    d_origin, d_cow = tmp_path / "d_origin", tmp_path / "d_cow"
    shutil.copyfile(origin, d_origin)
    shutil.copyfile(cow, d_cow)
    size = (ORIGIN_MIB << 20) // 512
    base = shlex.quote(f"0 {size} linear {o} 0")
    merge = shlex.quote(f"0 {size} snapshot-merge /dev/mapper/mbase {c} P {CHUNK}")
    try:
        # waits in the guest until every exception is merged (allocated == metadata sectors)
        dm_vm.sh(f"set -e; blockdev --flushbufs {o}; blockdev --flushbufs {c}\n"
                 f"dmsetup create mbase --table {base}\n"
                 f"dmsetup create smerge --table {merge}\n"
                 "i=0; while :; do set -- $(dmsetup status smerge); "
                 "[ \"${4%/*}\" = \"$5\" ] && break; i=$((i + 1)); "
                 "[ $i -lt 600 ] || { echo \"kernel merge stuck at $4 $5\" >&2; exit 1; }; "
                 "sleep 0.2; done", timeout=150)
        merged_sha = dm_vm.sha256_of("/dev/mapper/smerge")
    finally:
        _remove(dm_vm, "smerge mbase")
    assert merged_sha == rec["snap_sha"]

    res = _dmimage("snapshot", "merge", str(d_cow), str(d_origin))
    assert res.returncode == 0, res.stderr
    assert _sha(d_origin) == rec["snap_sha"]
    assert d_origin.read_bytes() == origin.read_bytes()
    # what the kernel left in its store after merging, dmimage reads as empty too
    for store in (d_cow, cow):
        rep = json.loads(_dmimage("snapshot", "check", str(store), "--json").stdout)
        assert rep["exceptions"] == 0 and rep["problems"] == []

    # The kernel takes dmimage's emptied store over the merged origin: nothing excepted.
    for src, dst in ((d_origin, origin), (d_cow, cow)):
        with open(src, "rb") as f, open(dst, "r+b") as g:
            shutil.copyfileobj(f, g, 1 << 20)
    again = _stack(dm_vm, o, c, "true")
    assert again["snap_sha"] == again["orig_sha"] == rec["snap_sha"]
    status = again["status"]
    assert isinstance(status, tuple) and status[0] == status[2]


def test_overflow_invalidates(dm_vm: Machine, tmp_path: Path) -> None:
    """A COW of 16 chunks overflows; the kernel invalidates the snapshot, dmimage says so."""
    origin, cow = tmp_path / "origin", tmp_path / "cow"
    origin.write_bytes(bytes(1 << 20))
    cow.write_bytes(bytes(16 * CHUNK * 512))
    with dm_vm.disks_attached([origin, cow], read_only=False) as (o, c):
        rec = _stack(dm_vm, o.guest_path, c.guest_path,
                     "dd if=/dev/urandom of=$ORIG bs=4096 count=64 conv=fsync status=none")
    assert "Invalid" in str(rec["status_line"])
    res = _dmimage("snapshot", "check", str(cow))
    assert res.returncode == 1 and "invalidated" in res.stdout
    res = _dmimage("snapshot", "export", str(cow), str(origin), "-o", str(tmp_path / "v"))
    assert res.returncode == 1 and "header.valid" in res.stderr


def test_bad_magic_refused_by_both(dm_vm: Machine, tmp_path: Path) -> None:
    origin, cow = tmp_path / "origin", tmp_path / "cow"
    origin.write_bytes(bytes(1 << 20))
    buf = bytearray(1 << 20)
    struct.pack_into("<4I", buf, 0, 0x70416E54, 1, 1, CHUNK)
    cow.write_bytes(buf)
    with dm_vm.disks_attached([origin, cow], read_only=False) as (o, c):
        # the kernel's reason: in the log lines since the last check (not the whole log)
        res = dm_vm.run("dmsetup create sbad --table " + shlex.quote(
            f"0 2048 snapshot {o.guest_path} {c.guest_path} P {CHUNK}") +
            f"; rc=$?; echo @@dmesg@@; {dm_vm.dmesg_since_command()}; exit $rc")
        if res.ok:
            dm_vm.sh("dmsetup remove sbad")
    log = res.out.partition("@@dmesg@@\n")[2]
    dm_vm.check_dmesg(log=log)
    assert not res.ok and "Invalid or corrupt snapshot" in log
    res2 = _dmimage("snapshot", "check", str(cow))
    assert res2.returncode == 1 and "header.magic" in res2.stderr
