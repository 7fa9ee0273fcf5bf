"""lvm2 writes, dmimage reads (issue 10 §4): a seeded lvm2 sequence in the guest, then offline.

In the guest (Debian 12's lvm2, dmimage/guest/lvm2.py): PVs on a GPT partition and on a bare disk,
one VG across both, a linear and a striped LV, a thin pool with a chosen chunk size, a thin,
snapshots of it and of the snapshot, writes, lvrename, lvremove, lvextend of the pool onto the
second PV. Offline on the host: ``dmimage lvm ls --json -a`` equals lvs's JSON, every LV's
export sha256 equals the guest's, ``lvm check`` is clean, our formatting of the vgcfgbackup
text is accepted by vgcfgrestore. Then the pool's transaction id is bumped behind lvm2's back
and a thin created that the VG does not know: ``lvm check`` exits 1 naming both; after
``lvm set-transaction-id`` (the VG's side, then after a second bump the superblock's side) and
``lvm delete-orphans`` lvm2 activates the pool again.

Both tests share one guest (a restore, a first run of lvm2 and the hashing disk's hot-plug
cost ~1.5-2 guest CPU-s each time); the disks stay attached while the host reads and writes
them, with nothing of the VG active and the guest's caches of them dropped (see
:func:`_drop_caches`).

``DMIMAGE_SAVE_LVM_FIXTURES=DIR`` saves the first MiB of each PV, gzip'd (tests/fixtures/lvm/).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import re
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmimage.guest.lvm2 import LvmMachine
from dmimage.guest.pytest_plugin import unavailable

pytestmark = [pytest.mark.vm, pytest.mark.vm_one_kernel]  # lvm2 is the oracle (conftest.py)

FIELDS = "lv_name,vg_name,lv_attr,lv_size,pool_lv,origin,segtype,thin_id,transaction_id,lv_uuid"
MiB = 1 << 20


def _kernels() -> list[str]:
    from dmimage.guest.kernels import selected_names

    return selected_names()


def _boot(name: str, *, share: bool = False) -> LvmMachine:
    from dmimage.guest.errors import HarnessUnavailable
    from dmimage.guest.kernels import KernelNotFound, kernel_by_name, qemu_binary

    if not qemu_binary():
        unavailable("qemu-system-x86_64 not found")
    try:
        vm = LvmMachine(kernel_by_name(name, fetch=True), memory_mb=768,
                        host_share="/" if share else None)
        vm.start()
    except (KernelNotFound, HarnessUnavailable) as exc:
        unavailable(str(exc))
    vm.lvm_setup()
    return vm


def lvm_guest_pool() -> Iterator[dict[str, LvmMachine]]:
    """The body of a module's ``lvm_guests`` fixture: the lvm2 guests its tests share, by
    kernel name (see :func:`lvm_guest`), closed when the module ends."""
    guests: dict[str, LvmMachine] = {}
    try:
        yield guests
    finally:
        for vm in guests.values():
            vm.close()


@pytest.fixture(scope="module")
def lvm_guests() -> Iterator[dict[str, LvmMachine]]:
    yield from lvm_guest_pool()


@contextlib.contextmanager
def lvm_guest(guests: dict[str, LvmMachine], kernel: str, *, share: bool = False
              ) -> Iterator[LvmMachine]:
    """The module's lvm2 guest for *kernel*, started on first use and handed from test to test
    (a restore and a close cost ~1 CPU-s a test, a first run of lvm2 in a fresh guest more).
    A test that passes leaves it as it found it (no device-mapper device, no disk attached:
    checked here); one that fails closes it, and the next test starts a fresh one."""
    vm = guests.pop(kernel, None)
    if vm is None or not vm.alive:
        if vm is not None:
            vm.close()
        vm = _boot(kernel, share=share)
    clean = False
    try:
        yield vm
        vm.sh("dmsetup remove_all", timeout=120)
        vm.detach_many(vm.disks)
        left = vm.sh("dmsetup ls")
        clean = left.strip() == "No devices found" and not vm.disks
        assert clean, f"the shared guest is not clean after the test: {left!r}"
    finally:
        if clean:
            guests[kernel] = vm
        else:
            vm.close()


def _drop_caches(devices: list[str]) -> str:
    """Guest shell: write back and drop the guest's page cache of *devices* (whole disks and
    partitions: each has its own), so the host may change the files behind them, and the guest
    then reads what the host wrote. lvm2, thin_check and the pool's dm-bufio read past the page
    cache anyway, and an LV's cache goes with its dm device; lvm2 keeps no state of its own
    between commands (no lvmetad, hints, backups or archives: dmimage/guest/lvm2.py)."""
    return " && ".join(f"blockdev --flushbufs {d}" for d in devices) + " && sync"


def _dmimage(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    from dmimage.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["lvm", *argv])
    return rc, out.getvalue(), err.getvalue()


def _disks(tmp_path: Path) -> tuple[str, str]:
    from dmimage.image.gpt import create_gpt, plan_layout

    a, b = str(tmp_path / "a.img"), str(tmp_path / "b.img")
    open(a, "wb").close()
    create_gpt(a, plan_layout(48 * MiB, MiB), [("pv", uuid.UUID(int=1)),
                                               ("spare", uuid.UUID(int=2))], uuid.UUID(int=3))
    with open(b, "wb") as f:
        f.truncate(48 * MiB)
    return a, b


def _lvs_json(vm: LvmMachine) -> dict[str, dict[str, str]]:
    out = vm.sh(f"lvs -a --reportformat json --units b --nosuffix -o {FIELDS} vgt")
    rows: list[dict[str, str]] = json.loads(out)["report"][0]["lv"]
    return {r["lv_name"]: r for r in rows}


def _put_texts(vm: LvmMachine, texts: dict[str, str], dest: str) -> None:
    """Write *texts* as ``dest/NAME`` in the guest, shipped as one gzip'd tar: the agent reads
    a script byte by byte (~0.05 guest CPU-s per KiB under TCG), and the texts are alike."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=9) as tar:
        for name, text in texts.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    vm.sh(f"mkdir -p {dest} && base64 -d <<'DMIMAGE_EOF' | tar -xzf - -C {dest}\n"
          + base64.encodebytes(buf.getvalue()).decode() + "DMIMAGE_EOF")


def _write(vm: LvmMachine, dev: str, rng: random.Random, size: int) -> None:
    """Three random 64 KiB-block writes, each fsync'd, in one guest command."""
    cmds = []
    for _ in range(3):
        count = rng.randint(1, 4)
        seek = rng.randrange(0, size // 65536 - count)
        cmds.append(f"dd if=/dev/urandom of={dev} bs=64k count={count} seek={seek} "
                    "conv=fsync status=none")
    vm.sh(" && ".join(cmds))


def _sequence(vm: LvmMachine, a1: str, b: str, rng: random.Random) -> list[str]:
    """A seeded lvm2 sequence; returns the thin LVs left, in creation order."""
    chunk = rng.choice([64, 128, 256])
    steps = [
        f"pvcreate -y {a1} {b}",
        f"vgcreate -s 1m vgt {a1} {b}",
        f"lvcreate -y -L {rng.randint(3, 6)}m -n lin vgt {a1}",
        "lvcreate -y -L 8m -i 2 -I 64k -n str vgt",
        f"lvcreate -y --type thin-pool -L 12m -c {chunk}k -n pool vgt {a1}",
        "lvcreate -y -V 16m -T vgt/pool -n thin1",
    ]
    vm.sh(" && ".join(f"{s} >/dev/null" for s in steps), timeout=180 * len(steps))
    _write(vm, "/dev/vgt/thin1", rng, 16 * MiB)
    thins = ["thin1"]
    parent = "thin1"
    for i in range(rng.randint(2, 3)):  # snapshots of snapshots, sometimes of an older one
        origin = parent if rng.random() < 0.7 else rng.choice(thins)
        name = f"snap{i + 1}"
        # -K: activated at once, though lvm2 sets a thin snapshot's activation-skip flag
        vm.sh(f"lvcreate -y -K -s -n {name} vgt/{origin}", timeout=180)
        _write(vm, f"/dev/vgt/{name}", rng, 16 * MiB)
        thins.append(name)
        parent = name
    vm.sh("lvcreate -y -V 8m -T vgt/pool -n gone", timeout=180)
    _write(vm, "/dev/vgt/gone", rng, 8 * MiB)
    vm.sh("lvremove -y vgt/gone", timeout=180)
    victim = rng.choice(thins)
    vm.sh(f"lvrename vgt {victim} renamed", timeout=180)
    thins[thins.index(victim)] = "renamed"
    vm.sh(f"lvextend -y -L +8m vgt/pool {b}", timeout=180)
    _write(vm, "/dev/vgt/lin", rng, 3 * MiB)
    _write(vm, "/dev/vgt/str", rng, 8 * MiB)
    return thins


def _guest_hashes(vm: LvmMachine, names: list[str]) -> dict[str, str]:
    vm.sh("vgchange -ay -K vgt", timeout=180)
    hashes = dict(zip(names, vm.sha256_many([(f"/dev/mapper/vgt-{n}", None) for n in names]),
                      strict=True))
    vm.sh("vgchange -an vgt", timeout=180)
    return hashes


def _host_hash(disks: list[str], lv: str, tmp_path: Path, vg: str = "vgt") -> str:
    out = tmp_path / f"{lv}.bin"
    rc, _, err = _dmimage("export", *disks, f"{vg}/{lv}", "-o", str(out))
    assert rc == 0, err
    h = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return h


def _save_fixtures(disks: list[str], kernel: str) -> None:
    dest = os.environ.get("DMIMAGE_SAVE_LVM_FIXTURES")
    if not dest:
        return
    from dmimage.lvm.ondisk import scan

    os.makedirs(dest, exist_ok=True)
    for label in scan(disks).labels:
        with open(label.region.path, "rb") as f:
            f.seek(label.region.offset)
            head = f.read(MiB)
        name = "gpt-part" if ":p" in label.region.name else "bare"
        with gzip.open(os.path.join(dest, f"lvm2-{kernel}-{name}.bin.gz"), "wb", 9) as g:
            g.write(head)


def _seeds() -> list[int]:
    from vmtests.scenario import seeds_from_env

    return seeds_from_env([10])


@pytest.mark.parametrize("seed", _seeds(), ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("kernel", _kernels())
def test_lvm2_writes_dmimage_reads(tmp_path: Path, kernel: str, seed: int,
                                   lvm_guests: dict[str, LvmMachine]) -> None:
    rng = random.Random(seed)
    a, b = _disks(tmp_path)
    disks = [a, b]
    with lvm_guest(lvm_guests, kernel) as vm:
        da, db = vm.attach_many([a, b], read_only=False)
        a1 = da.guest_path + "1"
        devices = [da.guest_path, a1, db.guest_path]
        vm.sh(f"test -b {a1}")
        thins = _sequence(vm, a1, db.guest_path, rng)
        want_hash = _guest_hashes(vm, ["lin", "str", *thins, "pool_tmeta"])
        guest_rows = _lvs_json(vm)
        # The VG inactive and the guest's cache of both disks written back and dropped, the
        # host reads the files as lvm2 left them. The host only reads them.
        backup = vm.sh("vgcfgbackup -f /tmp/vgt.txt vgt >/dev/null && cat /tmp/vgt.txt && "
                       + _drop_caches(devices))
        _save_fixtures(disks, kernel)

        # offline: lvs, exports, check
        rc, out, err = _dmimage("ls", "--json", "-a", *disks)
        assert rc == 0, err
        ours = {r["lv_name"]: r for r in json.loads(out)["report"][0]["lv"]}
        diff = {name: {k: (ours.get(name, {}).get(k), v) for k, v in row.items()
                       if ours.get(name, {}).get(k) != v}
                for name, row in guest_rows.items()}
        assert set(ours) == set(guest_rows) and not any(diff.values()), diff
        for lv, h in want_hash.items():
            assert _host_hash(disks, lv, tmp_path) == h, lv
        rc, out, err = _dmimage("check", *disks)
        assert (rc, err) == (0, ""), err

        # our formatting of lvm2's text is accepted by vgcfgrestore
        from dmimage.lvm.text import format_section, parse

        ours_text = format_section(parse(backup))
        assert parse(ours_text) == parse(backup)
        rc, _, err = _dmimage("metadata", *disks, "-o", str(tmp_path / "raw.txt"))
        assert rc == 0, err
        raw_text = (tmp_path / "raw.txt").read_text()
        _put_texts(vm, {"ours.txt": ours_text, "raw.txt": raw_text + "\n"}, "/tmp")
        vm.sh("vgcfgrestore --force -y -f /tmp/ours.txt vgt && vgck vgt", timeout=180)
        assert _lvs_json(vm) == guest_rows
        # and `dmimage lvm metadata` (the committed text as read offline) restores as well
        vm.sh("vgcfgrestore --force -y -f /tmp/raw.txt vgt && vgck vgt", timeout=180)
        assert _lvs_json(vm) == guest_rows

        # the transaction id bumped behind lvm2's back, and a thin the VG does not know
        vm.sh("lvchange -ay vgt/pool", timeout=180)
        status = vm.sh("dmsetup status vgt-pool-tpool").split()
        tid = int(status[3])
        vm.sh(f'dmsetup message vgt-pool-tpool 0 "set_transaction_id {tid} {tid + 1}" && '
              'dmsetup message vgt-pool-tpool 0 "create_thin 77"')
        vm.sh("vgchange -an vgt && " + _drop_caches(devices), timeout=180)

        # offline: the mismatch and the orphan found, and fixed on the VG's side
        rc, _, err = _dmimage("check", *disks)
        assert rc == 1
        assert (f"vgt/pool: transaction_id mismatch: VG metadata says {tid}, pool superblock "
                f"says {tid + 1}") in err
        assert re.search(r"vgt/pool: pool device 77 \(0 mapped blocks.*orphan", err), err
        rc, out, err = _dmimage("set-transaction-id", *disks, "vgt/pool")
        assert rc == 0, err
        rc, _, err = _dmimage("check", *disks)
        assert rc == 1 and "mismatch" not in err and "pool device 77" in err
        rc, out, err = _dmimage("delete-orphans", *disks, "vgt/pool")
        assert rc == 0 and "delete orphan thin device 77" in out, err
        rc, _, err = _dmimage("check", *disks)
        assert (rc, err) == (0, ""), err

        # lvm2 activates the pool again, reading what the host wrote
        vm.sh(_drop_caches(devices) + " && vgck vgt", timeout=180)  # the generation we wrote
        vm.sh("vgchange -ay -K vgt", timeout=180)
        got = vm.sha256_many([(f"/dev/mapper/vgt-{name}", None) for name in thins])
        for name, sha in zip(thins, got, strict=True):
            assert sha == want_hash[name], name
        assert _lvs_json(vm)["pool"]["transaction_id"] == str(tid + 1)
        # once more behind lvm2's back, fixed this time on the superblock's side
        vm.sh(f'dmsetup message vgt-pool-tpool 0 "set_transaction_id {tid + 1} {tid + 2}"')
        vm.sh("vgchange -an vgt && " + _drop_caches(devices), timeout=180)

        rc, _, err = _dmimage("check", *disks)
        assert (f"VG metadata says {tid + 1}, pool superblock says {tid + 2}") in err, err
        rc, out, err = _dmimage("set-transaction-id", "--side", "pool", *disks, "vgt/pool")
        assert rc == 0 and f"{tid + 2} -> {tid + 1}" in out, err

        # runs thin_check on the superblock we wrote
        vm.sh(_drop_caches(devices) + " && vgchange -ay -K vgt", timeout=180)
        assert vm.sh("dmsetup status vgt-pool-tpool").split()[3] == str(tid + 1)
        assert vm.sha256_of(f"/dev/mapper/vgt-{thins[-1]}") == want_hash[thins[-1]]
        vm.sh("vgchange -an vgt", timeout=180)


@pytest.mark.parametrize("kernel", _kernels())
def test_dmimage_builds_lvm2_reads(tmp_path: Path, kernel: str,
                                   lvm_guests: dict[str, LvmMachine]) -> None:
    """`dmimage build` with layout = "lvm": vgck and lvs accept the image, vgchange -ay
    activates it (thin_check included) with every thin's content as the manifest says; lvm2
    then adds a thin and writes to it, and `dmimage lvm check` stays clean."""
    from dmimage.image import build, load_spec

    from test_build_lvm import SPEC, write_inputs

    write_inputs(tmp_path)
    (tmp_path / "s.toml").write_text(SPEC)
    m = build(load_spec(tmp_path / "s.toml"), tmp_path / "out").manifest
    img = str(tmp_path / "out" / "lv.img")
    with lvm_guest(lvm_guests, kernel) as vm:
        d = vm.attach(img, read_only=False)
        vm.sh(f"test -b {d.guest_path}1 && vgck vgb && vgchange -ay vgb", timeout=180)
        devs = m["devices"] + m["linear"]
        got = vm.sha256_many([(f"/dev/mapper/vgb-{dev['name']}", None) for dev in devs])
        for dev, sha in zip(devs, got, strict=True):
            assert sha == dev["sha256"], dev
        vm.sh("lvcreate -y -V 2m -T vgb/tp -n c && dd if=/dev/urandom of=/dev/vgb/c bs=64k "
              "count=5 conv=fsync status=none", timeout=180)
        want_c = vm.sha256_of("/dev/mapper/vgb-c")
        vm.sh("vgchange -an vgb", timeout=180)
        out = vm.sh("lvs -a --reportformat json --units b --nosuffix "
                    f"-o {FIELDS.replace(',lv_uuid', '')} vgb")
        guest_rows = {r["lv_name"]: r for r in json.loads(out)["report"][0]["lv"]}
    rc, _, err = _dmimage("check", img)
    assert (rc, err) == (0, ""), err
    rc, out, err = _dmimage("ls", "--json", "-a", img)
    ours = {r["lv_name"]: {k: v for k, v in r.items() if k != "lv_uuid"}
            for r in json.loads(out)["report"][0]["lv"]}
    assert ours == guest_rows
    assert _host_hash([img], "c", tmp_path, "vgb") == want_c
