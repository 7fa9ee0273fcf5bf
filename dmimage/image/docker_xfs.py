"""``[docker] fs = "xfs"``: the store's thin devices written by the real kernel in the
project's QEMU guest, as dockerd 20.10 with ``dm.fs=xfs`` writes them.

No offline writer makes an xfs a layer at a time in place (Debian 12's xfsprogs cannot
populate one; later ``mkfs.xfs -p`` makes a new filesystem per layer, so a snapshot would
share nothing with its parent). So the host formats an empty pool and the guest does what
dockerd's devicemapper driver does, with the same tools and options: the pool activated from
the two files (``thin-pool META DATA 128 32768 1 skip_block_zeroing``), ``create_thin 1`` and
``set_transaction_id 0 1``, ``mkfs.xfs`` (Debian 12's xfsprogs 6.1, dockerd's command line:
no options; ``-m uuid=`` only if the spec names ``base_uuid``) on the base device; then per
layer, parents first, ``create_snap`` of the parent's device (inactive, as dockerd's) and
``set_transaction_id``, the device mounted ``-o nouuid`` (deviceset.go's MountDevice), what
the driver's Get does at every mount (``rootfs/`` 0755 root; ``id`` on a first layer), the
layer applied with
:mod:`dmimage.docker.unpack` (this Python, run in a chroot of the host's root shared
read-only over virtio-9p, so it reads the layer tars where the host wrote them), then
unmounted and deactivated. The kernel commits the pool's metadata when the pool is removed;
the host reads everything back (``docker_store._self_check``).

The guest is the Docker tools guest (:class:`dmimage.guest.docker.DockerGuest`: Debian 12's
xfsprogs and the xfs module); without QEMU or a kernel the build stops with one line, exit 2,
as ``build --vm-verify`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dmimage.guest.docker import DockerGuest

#: dockerd's pool table after the devices: data block size (64 KiB), low water mark, one
#: feature (``skip_block_zeroing``: dm.blkdiscard and zeroing are off by default).
POOL_ARGS = "128 32768 1 skip_block_zeroing"
POOL = "dmimage-build-pool"
#: Where the guest mounts the host's root (read-only; the chroot the applier runs in).
SHARE = "/tmp/host"


@dataclass(frozen=True)
class XfsLayer:
    """One layer's device: its hash, id, the parent's id (1: the base) and its tar."""

    device_hash: str
    device_id: int
    parent_id: int
    tar: Path
    first: bool


def _checkout() -> Path:
    import dmimage

    return Path(dmimage.__file__).resolve().parent.parent


def _compile_applier() -> None:
    """Bytecode for the modules the guest's Python imports, beside their sources (where the
    guest looks; it cannot write to the read-only share, and compiling under TCG costs a
    second): best effort, an installed dmimage has it already."""
    import py_compile

    pkg = _checkout() / "dmimage"
    for src in (pkg / "__init__.py", pkg / "docker/__init__.py", pkg / "docker/gotar.py",
                pkg / "docker/unpack.py"):
        try:
            py_compile.compile(str(src), cfile=_default_cache(src), doraise=True)
        except (OSError, py_compile.PyCompileError):
            pass


def _default_cache(src: Path) -> str:
    """``__pycache__/NAME.TAG.pyc`` beside *src*, whatever ``sys.pycache_prefix`` says."""
    import importlib.util

    prefix, sys.pycache_prefix = sys.pycache_prefix, None
    try:
        return importlib.util.cache_from_source(str(src))
    finally:
        sys.pycache_prefix = prefix


def jobs_json(mnt: Path, layers: list[XfsLayer]) -> str:
    """The applier's jobs (``dmimage.docker.unpack.serve``): [mount, tar, hash or null]."""
    return json.dumps([[str(mnt), str(x.tar), x.device_hash if x.first else None]
                       for x in layers])


def guest_script(meta: str, data: str, data_size: int, base_size: int, mnt: Path,
                 layers: list[XfsLayer], base_uuid: str | None, jobs: Path) -> str:
    """The guest's shell commands (busybox ash, the tools disk on PATH): every step checked;
    on failure what is active is removed and the script exits 1. The applier is started
    once (*jobs*: ``jobs_json``) and applies a layer per line it is sent."""
    from dmimage.guest.docker import MOUNT

    q = shlex.quote
    py = (f"chroot {SHARE} env PYTHONPATH={q(str(_checkout()))} {q(sys.executable)} "
          f"-m dmimage.docker.unpack --jobs {q(str(jobs))}")
    gmnt = q(f"{SHARE}{mnt}")
    sectors = base_size // 512
    uuid = f" -m uuid={q(base_uuid)}" if base_uuid else ""
    lines = [
        "upid=",
        "cleanup() { exec 3>&- 4<&-; [ -z \"$upid\" ] || kill $upid 2>/dev/null; "
        "umount " + gmnt + " 2>/dev/null; for d in $(dmsetup ls | "
        "cut -f1 | grep '^dmimage-build-'); do [ $d = " + POOL + " ] || dmsetup remove $d; "
        "done; dmsetup remove " + POOL + " 2>/dev/null; }",
        "fail() { printf '%s\\n' \"$(echo \"$1\" | tr '\\n' ' ')\" >&2; cleanup; exit 1; }",
        f"[ -d /sys/module/xfs ] || insmod {MOUNT}/modules/xfs.ko || fail 'no xfs module'",
        f"dmsetup create {POOL} --table "
        f"{q(f'0 {data_size // 512} thin-pool {meta} {data} {POOL_ARGS}')} "
        "|| fail 'the pool does not activate'",
        f"m() {{ dmsetup message {POOL} 0 \"$1\" || fail \"message $1 refused\"; }}",
        "m 'create_thin 1'; m 'set_transaction_id 0 1'",
        f"dmsetup create dmimage-build-base --table '0 {sectors} thin /dev/mapper/{POOL} 1' "
        "|| fail 'base device'",
        f"mkfs.xfs{uuid} /dev/mapper/dmimage-build-base >/tmp/mkfs.out 2>&1 || "
        "fail \"mkfs.xfs: $(tail -n 3 /tmp/mkfs.out | tr '\\n' ' ')\"",
        "echo \"@@uuid $(blkid -s UUID -o value /dev/mapper/dmimage-build-base)\"",
        "dmsetup remove dmimage-build-base || fail 'base device busy'",
        "rm -f /tmp/ureq /tmp/urep && mkfifo /tmp/ureq /tmp/urep || fail 'mkfifo'",
        f"{py} </tmp/ureq >/tmp/urep 2>/tmp/unpack.err & upid=$!",
        "exec 3>/tmp/ureq 4</tmp/urep",
    ]
    for i, lay in enumerate(layers):
        tid = lay.device_id
        name = f"dmimage-build-{lay.device_hash[:12]}"
        lines += [
            f"m 'create_snap {lay.device_id} {lay.parent_id}'; "
            f"m 'set_transaction_id {tid - 1} {tid}'",
            f"dmsetup create {name} --table '0 {sectors} thin /dev/mapper/{POOL} "
            f"{lay.device_id}' || fail 'device {lay.device_id}'",
            f"mount -t xfs -o nouuid /dev/mapper/{name} {gmnt} 2>/tmp/mount.err || "
            f"fail \"device {lay.device_id}: mount: $(tail -n 1 /tmp/mount.err; "
            "dmesg | tail -n 2 | tr '\\n' ' ')\"",
            "echo go >&3; read -r ans <&4 || ans=\"the applier stopped: "
            "$(tail -n 1 /tmp/unpack.err)\"",
            f"[ \"$ans\" = ok ] || fail \"layer {i + 1} (device {lay.device_id}): $ans\"",
            f"umount {gmnt} || fail 'device {lay.device_id}: umount'",
            f"dmsetup remove {name} || fail 'device {lay.device_id} busy'",
        ]
    lines += ["exec 3>&- 4<&-; wait $upid || fail \"the applier: $(tail -n 1 /tmp/unpack.err)\"",
              "upid=",
              f"dmsetup remove {POOL} || fail 'pool busy'",
              f"blockdev --flushbufs {meta} && blockdev --flushbufs {data}"]
    return "\n".join(lines) + "\n"


def write_devices(meta_file: Path, data_file: Path, data_size: int, base_size: int,
                  layers: list[XfsLayer], mnt: Path, *, base_uuid: str | None = None,
                  guest: DockerGuest | None = None, kernel: str = "deb12",
                  log: Callable[[str], None] | None = None) -> str:
    """Write the base device and every layer's snapshot into the pool files (formatted
    empty) in a guest: *guest* (a :class:`DockerGuest` booted with ``host_share="/"``), or
    one booted here on *kernel* and shut down after. *mnt*: an empty host directory the
    guest mounts each device on (seen through the share). Returns the base device's UUID
    (blkid's, as dockerd's saveBaseDeviceUUID reads it)."""
    from dmimage.guest.docker import MOUNT, DockerGuest
    from dmimage.image.build import BuildError

    say = log or (lambda s: None)
    # the guest sees the host's root: absolute paths (OUTDIR may be relative)
    mnt = mnt.resolve()
    _compile_applier()
    layers = [dataclasses.replace(x, tar=x.tar.resolve()) for x in layers]
    with contextlib.ExitStack() as stack:
        if guest is None:
            guest = stack.enter_context(DockerGuest.boot(kernel, host_share="/"))
        vm = guest.vm
        vm.mount_host_share(SHARE)
        disks = vm.attach_many([meta_file, data_file], read_only=False)
        try:
            jobs = mnt.parent / "unpack-jobs.json"
            jobs.write_text(jobs_json(mnt, layers))
            script = guest_script(disks[0].guest_path, disks[1].guest_path, data_size,
                                  base_size, mnt, layers, base_uuid, jobs)
            res = vm.run(f"export PATH={MOUNT}/bin:/sbin:/bin:/usr/sbin:/usr/bin\n"
                         + script, timeout=300 + 120 * len(layers))
        finally:
            if vm.alive:
                vm.detach_many(list(reversed(disks)))
        if not res.ok:
            why = (res.err.strip().splitlines() or [f"exit {res.returncode}"])[-1]
            raise BuildError(f"xfs in the guest ({vm.kernel}): {why}")
        found = [ln.split()[1] for ln in res.out.splitlines()
                 if ln.startswith("@@uuid ") and len(ln.split()) == 2]
        if len(found) != 1:
            raise BuildError(f"xfs in the guest: blkid gave no UUID for the base device "
                             f"({res.out[-200:]!r})")
        say(f"xfs: base and {len(layers)} layers written by the kernel in the guest "
            f"({vm.kernel}), base UUID {found[0]}")
        return found[0]
    raise AssertionError("unreachable")
