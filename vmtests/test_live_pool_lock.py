"""A live pool's metadata is refused to dmimage's writers (docs/locking.md): in the guest, with
the pool active, `dmimage write` and `dmimage message` on its metadata device exit 2 with one
line naming the holder, and the metadata is unchanged byte for byte; once the pool is removed
the same write succeeds and the kernel reads what was written.

The guest has no Python: the machine shares the host's root filesystem read-only over
virtio-9p (``Machine(host_share="/")``) and the very dmimage of this checkout runs in a chroot
of it, against the guest's block devices (O_EXCL is the guest kernel's answer). Each command
is a process of its own, forked by vmtests/guest_forkserver.py after one Python start with
dmimage's imports (a start cost the TCG guest 1-4 CPU-s, numpy's import most of it)."""

from __future__ import annotations

import hashlib
import os
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmimage.cli.main import main
from dmimage.guest.agent import CommandResult
from dmimage.guest.machine import Machine
from vmtests.guest_forkserver import GuestDmimage
from vmtests.scenario import PoolSession, make_pool_files

pytestmark = [pytest.mark.vm, pytest.mark.vm_one_kernel]  # O_EXCL: the block layer (conftest.py)

#: Python's start-up over 9p in a TCG guest is slow: generous limits.
CMD_TIMEOUT = 600.0


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "share_vm" in metafunc.fixturenames:
        from dmimage.guest.pytest_plugin import _kernel_names

        names = _kernel_names(metafunc.config)
        metafunc.parametrize("share_vm", names, indirect=True, scope="module", ids=names)


@pytest.fixture(scope="module")
def share_vm(request: pytest.FixtureRequest) -> Iterator[Machine]:
    from dmimage.guest.errors import HarnessUnavailable
    from dmimage.guest.kernels import KernelNotFound, kernel_by_name, qemu_binary
    from dmimage.guest.pytest_plugin import unavailable

    if not qemu_binary():
        unavailable("qemu-system-x86_64 not found")
    try:
        kernel = kernel_by_name(request.param, fetch=True)
    except KernelNotFound as exc:
        unavailable(str(exc))
    try:
        vm = Machine(kernel, host_share="/", memory_mb=512).start()
    except HarnessUnavailable as exc:
        unavailable(str(exc))
    try:
        yield vm
    finally:
        vm.close()


#: What the commands below import: the fork server imports it once.
PRELOAD = ("dmimage.cli.write", "dmimage.cli.message", "dmimage.cli._progress",
           "dmimage.thin.transaction")


@pytest.fixture(scope="module")
def guest_dmimage(share_vm: Machine) -> GuestDmimage:
    return GuestDmimage(share_vm, PRELOAD).start(timeout=CMD_TIMEOUT)


def test_host_share_binds_the_guests_dev_proc_and_sys(share_vm: Machine) -> None:
    """The chroot's /dev, /proc and /sys are the guest's own, each at its name (the host's
    three are each inode 1 of a file system of their own: one inode to a 9p cache that
    ignores the device, and /proc was bound under /sys)."""
    from vmtests.guest_cli import ROOT

    share_vm.mount_host_share(ROOT)
    mounts = share_vm.sh("cat /proc/mounts").splitlines()
    fs = {w[1]: w[2] for w in (line.split() for line in mounts) if len(w) > 2}
    assert [fs.get(f"{ROOT}/{m}") for m in ("dev", "proc", "sys")] == \
        ["devtmpfs", "proc", "sysfs"], mounts
    # A program in the chroot reads its own process in /proc.
    assert share_vm.sh(f"chroot {ROOT} /bin/cat /proc/self/stat").split()[1] == "(cat)"


def _dmimage(server: GuestDmimage, args: str, stdin: str | None = None) -> CommandResult:
    redirect = f" < {shlex.quote(stdin)}" if stdin else ""
    return server.vm.run(server.command(args) + redirect, timeout=CMD_TIMEOUT)


def _holders(vm: Machine, dev: str) -> list[str]:
    """``dm-N (name)`` for each holder of guest device ``dev``, read by the guest's shell."""
    name = os.path.basename(dev)
    out = vm.sh(f"for h in $(ls /sys/class/block/{name}/holders); do "
                f"echo \"$h ($(cat /sys/class/block/$h/dm/name))\"; done")
    return [line for line in out.splitlines() if line]


def test_live_pool_metadata_is_refused(share_vm: Machine, guest_dmimage: GuestDmimage,
                                       tmp_path: Path) -> None:
    vm = share_vm
    files = make_pool_files(tmp_path, nr_data_blocks=64)
    for argv in (["format", str(files.meta), "--data-block-size", str(files.block_sectors),
                  "--nr-data-blocks", str(files.nr_data_blocks)],
                 ["message", str(files.meta), "create_thin 1"]):
        assert main(argv) == 0, argv  # in this process: no Python start-up
    line = b"live pool lock\n"
    payload = (line * (files.block_bytes // len(line) + 1))[: files.block_bytes]
    session = PoolSession(vm, files)
    with session:
        assert session.meta_disk is not None and session.data_disk is not None
        meta, data = session.meta_disk.guest_path, session.data_disk.guest_path
        vm.sh(f"yes 'live pool lock' | head -c {len(payload)} > /tmp/payload")
        assert vm.sha256_of("/tmp/payload") == hashlib.sha256(payload).hexdigest()
        holders = _holders(vm, meta)
        assert holders and all(h.endswith(f"({session.name})") for h in holders), holders
        before = vm.sha256_of(meta)

        for args, stdin in ((f"write {meta} {data} --dev-id 1 -i -", "/tmp/payload"),
                            (f"message {meta} 'create_thin 2'", None)):
            r = _dmimage(guest_dmimage, args, stdin)
            err = r.stderr.decode()
            assert r.returncode == 2, (args, r)
            assert err.count("\n") == 1, err
            assert f"{meta}: held by {', '.join(holders)}" in err, (err, holders)
            assert "nothing was changed" in err
            print(f"[{vm.kernel.name}] refused: {err.strip()}")
            assert vm.sha256_of(meta) == before, args

        # The pool gone (its disks still attached), the same write goes through.
        session.sh(f"dmsetup remove {session.name}")
        session.pool_active = False
        assert _holders(vm, meta) == []
        r = _dmimage(guest_dmimage, f"write {meta} {data} --dev-id 1 -i -", "/tmp/payload")
        assert r.returncode == 0, r
        assert vm.sha256_of(meta) != before

        # The kernel reads what was written.
        session.activate()
        thin = session.activate_thin(1)
        got = vm.sha256_of(thin, size=len(payload))
        assert got == hashlib.sha256(payload).hexdigest()
    vm.check_dmesg()
