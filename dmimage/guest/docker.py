"""Debian 12's dockerd 20.10 with the devicemapper driver, running in the guest.

The Docker binaries are not put into the initramfs: they travel on a read-only ext4 "tools
disk" built without root (``mke2fs -d``) and cached by content hash, next to the libraries
``ldd`` names, e2fsprogs' mkfs.ext4/tune2fs, util-linux's blkid (deviceset.go runs all three)
and the ``loop`` module, and Debian 12's lvm2 with the host's thin_check for a direct-lvm pool
(``DockerGuest.lvm_setup``): one guest serves every Docker test. The .debs come from Debian 12
(``apt-get download`` into the cache, ``dpkg-deb -x``); nothing is installed on the host.

dockerd starts in about a second under TCG with loop-lvm, ``dm.fs=ext4``,
``dm.override_udev_sync_check=true``, ``--iptables=false --bridge=none``, its data root on an
ext4 virtio disk, /var/run linked to /run and cgroup2 mounted. Small loop files keep the data
root small: ``dm.loopdatasize``, ``dm.loopmetadatasize`` and ``dm.basesize``.

Under TCG every start of a Go program costs about a second of the guest's CPU, so the tests
talk to dockerd's Engine API from busybox (``api`` and ``fetch`` for reads, ``calls`` for the
requests the docker CLI would send) and move files through one transfer disk (``put``,
``get_many``); ``docker`` runs the CLI itself.

    with DockerGuest.boot("deb12") as dg:
        dg.start(data_disk_path)
        dg.put({"/tmp/a.tar": Path("a.tar")})
        dg.calls([Call("POST", "/images/create?fromSrc=-&repo=img:1", "import", body="/tmp/a.tar")])
        dg.stop()
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from dmimage.guest.appliance import ApplianceError, cache_root, read_module
from dmimage.guest.debs import unpacked
from dmimage.guest.kernels import Kernel, kernel_by_name
from dmimage.guest.lvm2 import LVM_CONF, RUN_DIRS, lvm2_root
from dmimage.guest.machine import Disk, Machine

#: Debian 12 packages unpacked for the guest (docker.io needs containerd; runc for
#: completeness; xfsprogs and its libraries for ``dm.fs=xfs``).
PACKAGES = ("docker.io", "containerd", "runc", "xfsprogs", "libinih1", "liburcu8")
#: Files whose presence says the unpacked cache is complete.
REQUIRED = ("usr/sbin/dockerd", "sbin/mkfs.xfs")

#: (path in the unpacked .debs or on the host, name in the tools disk's bin/).
BINARIES = (
    ("debs:usr/sbin/dockerd", "dockerd"),
    ("debs:usr/bin/docker", "docker"),
    ("debs:usr/bin/containerd", "containerd"),
    ("debs:usr/bin/containerd-shim-runc-v2", "containerd-shim-runc-v2"),
    ("debs:usr/sbin/runc", "runc"),
    ("host:/sbin/mke2fs", "mkfs.ext4"),
    ("host:/sbin/tune2fs", "tune2fs"),
    ("host:/sbin/resize2fs", "resize2fs"),
    ("host:/sbin/blkid", "blkid"),
    ("debs:sbin/mkfs.xfs", "mkfs.xfs"),
    ("debs:usr/sbin/xfs_growfs", "xfs_growfs"),
    # For a direct-lvm pool (``dm.thinpooldev``, ``DockerGuest.lvm_setup``): Debian 12's
    # lvm2 (the .deb dmimage.guest.lvm2 unpacks) and the thin_check it runs at activation
    # (the host's pdata_tools, dispatching on its name), so one guest serves every Docker
    # test instead of a second guest booted with the lvm2 appliance.
    ("lvm2:sbin/lvm", "lvm"),
    ("host:/usr/sbin/thin_check", "thin_check"),
)

#: Modules dockerd's devicemapper driver needs beyond the appliance's (dm-thin-pool, ext4).
MODULES = ("loop", "xfs")

#: Guest memory: dockerd and containerd together take a few hundred MB.
MEMORY_MB = 1024

#: The storage options every test uses: 128 MiB data, 16 MiB metadata, 16 MiB devices (each
#: device is hashed whole in the guest: small devices keep that quick under TCG).
STORAGE_OPTS = ("dm.fs=ext4", "dm.override_udev_sync_check=true", "dm.loopdatasize=128M",
                "dm.loopmetadatasize=16M", "dm.basesize=16M", "dm.min_free_space=0%")


def storage_opts(extra: Sequence[str] = ()) -> list[str]:
    """``STORAGE_OPTS`` with *extra* added; an extra option of the same key (``dm.basesize``)
    replaces the default one rather than following it (dockerd would take the last)."""
    keys = {o.split("=", 1)[0] for o in extra}
    return [*(o for o in STORAGE_OPTS if o.split("=", 1)[0] not in keys), *extra]


MOUNT = "/opt/docker"
DATA_ROOT = "/var/lib/docker"


class DockerUnavailable(ApplianceError):
    """The Docker packages cannot be fetched or unpacked."""


def debs_root(*, fetch: bool = True) -> Path:
    """The unpacked Debian 12 packages (``<cache>/docker-debs/root``), fetched when a file
    the guest needs is missing (a cache from before a package was added is refreshed;
    guest/debs.py)."""
    root = cache_root() / "docker-debs" / "root"
    if not fetch and not _complete(root):
        raise DockerUnavailable(f"{root}: Docker packages not unpacked")
    return unpacked(root.parent, PACKAGES, _complete, error=DockerUnavailable)


def _complete(root: Path) -> bool:
    return all((root / r).exists() for r in REQUIRED)


def _libraries(binary: Path, extra: Path) -> list[Path]:
    """What ``ldd`` names for *binary*, looking in *extra* (the unpacked packages' library
    directory) before the host's; the loader itself is left out (the appliance has it)."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(extra)}
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False,
                         env=env)
    libs = []
    for line in out.stdout.splitlines():
        if "not found" in line:
            raise DockerUnavailable(f"{binary}: ldd says {line.strip()}")
        m = re.match(r"\s*\S+ => (/\S+) \(", line)
        if m and "ld-linux" not in m.group(1):
            libs.append(Path(m.group(1)))
    return libs


def _sources(kernel: Kernel) -> tuple[list[tuple[Path, str]], list[Path], list[Path]]:
    """(binary, name) pairs, the libraries they need and the module files."""
    debs = debs_root()
    bins: list[tuple[Path, str]] = []
    for where, name in BINARIES:
        kind, _, p = where.partition(":")
        path = debs / p if kind == "debs" else lvm2_root() / p if kind == "lvm2" else Path(p)
        if not path.exists():
            raise DockerUnavailable(f"{path} is missing (needed as {name} in the guest)")
        bins.append((path, name))
    libs: dict[str, Path] = {}
    for path, _ in bins:
        for lib in _libraries(path, debs / "usr/lib/x86_64-linux-gnu"):
            libs.setdefault(lib.name, lib)
    dep = {line.split(":", 1)[0] for line in
           (kernel.moddir / "modules.dep").read_text().splitlines() if ":" in line}
    mods = []
    for m in MODULES:
        found = [d for d in dep if os.path.basename(d).split(".ko")[0] == m]
        if found:
            mods.append(kernel.moddir / found[0])
    return bins, list(libs.values()), mods


def tools_disk(kernel: Kernel) -> Path:
    """The read-only ext4 image holding bin/, lib/, modules/ and etc/mke2fs.conf (cached)."""
    bins, libs, mods = _sources(kernel)
    h = hashlib.sha256(b"dmimage-docker-tools-v1\0")
    for p in [*(b for b, _ in bins), *libs, *mods]:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    out = cache_root() / "docker-tools" / f"tools-{h.hexdigest()[:20]}.ext4"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        stage = Path(tmp) / "stage"
        for d in ("bin", "lib", "modules", "etc"):
            (stage / d).mkdir(parents=True)
        total = 0
        for path, name in bins:
            shutil.copyfile(path, stage / "bin" / name)
            (stage / "bin" / name).chmod(0o755)
            total += path.stat().st_size
        for lib in libs:
            shutil.copyfile(lib, stage / "lib" / lib.name)
            total += lib.stat().st_size
        for m in mods:
            name = m.name.split(".ko")[0] + ".ko"
            (stage / "modules" / name).write_bytes(read_module(m))
        if Path("/etc/mke2fs.conf").exists():
            shutil.copyfile("/etc/mke2fs.conf", stage / "etc/mke2fs.conf")
        size = (total * 5 // 4 + (64 << 20)) // (1 << 20) * (1 << 20)
        img = Path(tmp) / "tools.ext4"
        with open(img, "wb") as f:
            f.truncate(size)
        subprocess.run(["mke2fs", "-q", "-t", "ext4", "-F", "-m", "0", "-d", str(stage),
                        str(img)], check=True, capture_output=True)
        os.replace(img, out)
    return out


def make_data_disk(path: Path, size: int = 1 << 30) -> Path:
    """An empty ext4 filesystem in a sparse file: the disk dockerd's data root lives on."""
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-F", "-m", "0", "-E",
                    "lazy_itable_init=1,lazy_journal_init=1", str(path)], check=True,
                   capture_output=True)
    return path


#: See GUEST_SETUP.
WAIT_FIFO = "/tmp/.dockerwait"

GUEST_SETUP = f"""
set -e
mkdir -p {MOUNT} /var /run /etc/docker /sys/fs/cgroup
[ -e /var/run ] || ln -s /run /var/run
ip link set lo up  # dockerd's API on 127.0.0.1 too (``DockerGuest.api``)
mountpoint -q {MOUNT} || mount -t ext4 -o ro "$1" {MOUNT}
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup
[ -e /etc/mke2fs.conf ] || cp {MOUNT}/etc/mke2fs.conf /etc/ 2>/dev/null || true
# dockerd re-executes itself with a clean environment (docker-applyLayer): its libraries must
# be where the loader looks by default, not on LD_LIBRARY_PATH.
# (The missing ones in one ln, the modules checked with builtins: a process each is ~10 ms of
# CPU under TCG. xfs is loaded by ``DockerGuest.start`` when a store asks for it.)
mkdir -p /lib/x86_64-linux-gnu
set --
for l in {MOUNT}/lib/*; do [ -e "/lib/x86_64-linux-gnu/${{l##*/}}" ] || set -- "$@" "$l"; done
[ $# -eq 0 ] || ln -s "$@" /lib/x86_64-linux-gnu/
for m in {MOUNT}/modules/*.ko; do
  n=${{m##*/}}; n=${{n%.ko}}
  [ -e "$m" ] && [ "$n" != xfs ] || continue
  [ -d /sys/module/$n ] || insmod "$m"
done
# What the waits below sleep on: the read builtin's timeout on a fifo nobody writes (busybox's
# sleep is a process, ~10 ms of CPU under TCG; a wait polled every 0.1 s spent seconds on it).
[ -p {WAIT_FIFO} ] || mkfifo {WAIT_FIFO}
# Read the big binaries into the page cache while the host prepares the data disk (the first
# start otherwise waits seconds for them).
(cat {MOUNT}/bin/dockerd {MOUNT}/bin/containerd >/dev/null 2>&1 &)
"""

#: containerd's configuration: what dockerd writes for the containerd it manages (the CRI
#: plugin off), with its socket and state paths, but its root outside the data root: one
#: containerd serves every dockerd the guest starts (``DockerGuest.start``). Its snapshotters
#: are off too: dockerd keeps layers in its own graph driver (devicemapper) and never asks
#: containerd for one, and probing them at start (``modprobe aufs``, a trial overlay mount, a
#: statfs for btrfs and zfs) cost ~0.3 s of the guest's CPU per guest.
CONTAINERD_SOCK = "/run/docker/containerd/containerd.sock"
CONTAINERD_DISABLED = ("io.containerd.grpc.v1.cri", *(
    f"io.containerd.snapshotter.v1.{s}" for s in ("aufs", "btrfs", "devmapper", "overlayfs",
                                                    "zfs")))
CONTAINERD_TOML = f"""version = 2
root = "/run/docker/containerd/root"
state = "/run/docker/containerd/daemon"
disabled_plugins = [{", ".join(f'"{p}"' for p in CONTAINERD_DISABLED)}]
[grpc]
  address = "{CONTAINERD_SOCK}"
[debug]
  level = "debug"
"""

ENV = f"export PATH={MOUNT}/bin:/sbin:/bin DOCKER_HOST=unix:///run/docker.sock; "

#: dockerd also serves its API here, inside the guest only, for ``DockerGuest.api``
#: (``--tls=false`` said explicitly: dockerd 20.10 otherwise delays its start to warn).
API = "127.0.0.1:2375"


#: The guest's HTTP client for the Engine API calls that write (``DockerGuest.calls``): busybox
#: wget only sends GET and POST, so each request goes through ``nc -e``, whose program writes
#: the request and then reads the answer on the same socket. The connection stays open until
#: dockerd has answered: a client that half-closes it (plain ``nc``) makes Go's HTTP server
#: cancel the request's context. HTTP/1.0, so the answer is never chunked and ends at close.
#: ``dreq N METHOD PATH BODYFILE CTYPE REFUSAL_OK`` leaves a line "@@api N" (after an empty
#: one), then the raw answer, in /tmp/api/N, and fails on an answer the CLI would fail on: a
#: status other than 2xx (a 4xx only with REFUSAL_OK), or an error in the progress stream of
#: an import or load.
API_CLIENT = r"""rm -rf /tmp/api; mkdir /tmp/api
dreq() {
  n=0; [ -z "$4" ] || n=$(stat -c %s "$4")
  { printf '%s /v1.41%s HTTP/1.0\r\nHost: docker\r\nContent-Length: %s\r\n' "$2" "$3" "$n"
    [ -z "$5" ] || printf 'Content-Type: %s\r\n' "$5"
    printf '\r\n'; } > /tmp/api/h
  printf '\n@@api %s\n' "$1" > /tmp/api/$1
  nc 127.0.0.1 2375 -e sh -c "cat /tmp/api/h $4; exec cat >> /tmp/api/$1" || return 1
  { read -r x; read -r x; read -r x code x; } < /tmp/api/$1
  case $code in
    2??) case $3 in /images/create*|/images/load*) ! grep -q '"errorDetail"' /tmp/api/$1;; esac;;
    4??) [ "$6" = 1 ];;
    *) false;;
  esac
}
"""


@dataclass(frozen=True)
class Call:
    """One Engine API request for :meth:`DockerGuest.calls`: what the docker CLI sends for
    the command in *label*, minus its read-only preliminaries (``docker cp`` first stats the
    destination; the archive sent here already holds the name that stat would give)."""

    method: str
    #: After ``/v1.41``, with the query.
    path: str
    label: str
    #: A guest file sent as the body, or an inline body (JSON text).
    body: str | None = None
    data: str | None = None
    ctype: str | None = None
    #: A 4xx answer (``rmi`` of an image a container uses) is an answer, not a failure.
    refusal_ok: bool = False


@dataclass(frozen=True)
class Reply:
    """dockerd's answer to a :class:`Call`."""

    status: int
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body)


def _parse_replies(out: bytes) -> dict[int, Reply]:
    """The answers in ``calls``' output: "@@api N" lines, each after an empty line and
    followed by a raw HTTP/1.0 answer (status line, headers, a blank line, the body)."""
    replies: dict[int, Reply] = {}
    parts = re.split(rb"\n@@api (\d+)\n", out)
    for num, raw in zip(parts[1::2], parts[2::2], strict=True):
        head, sep, body = raw.partition(b"\r\n\r\n")
        words = head.split(b"\r\n", 1)[0].split()
        if not sep or len(words) < 2 or not words[1].isdigit():
            raise ApplianceError(f"dockerd API: answer {int(num)} is not HTTP: {raw[:200]!r}")
        replies[int(num)] = Reply(int(words[1]), body)
    return replies


class DockerGuest:
    """A booted guest with the tools disk mounted; ``start``/``stop`` dockerd on a data disk."""

    def __init__(self, machine: Machine, kernel: Kernel) -> None:
        self.vm = machine
        self.kernel = kernel
        self.tools: Disk | None = None
        #: The data disk mounted on /var/lib/docker, if any.
        self.data: Disk | None = None
        #: Every data disk attached so far, by host path, with the (st_dev, st_ino) attached:
        #: each stays attached for the guest's lifetime (``start``, ``_data_disk``).
        self.data_disks: dict[Path, tuple[Disk, tuple[int, int]]] = {}
        self._data_serial = 0
        self.xfer: Disk | None = None

    @classmethod
    def boot(cls, kernel_name: str = "deb12", *, host_share: str | None = None
             ) -> DockerGuest:
        """A guest with the tools disk attached and set up (``GUEST_SETUP``); *host_share*:
        see ``Machine`` (``dmimage.image.docker_xfs`` runs this checkout's Python in a chroot
        of it)."""
        kernel = kernel_by_name(kernel_name)
        disk = tools_disk(kernel)
        vm = Machine(kernel, memory_mb=MEMORY_MB, host_share=host_share).start()
        try:
            dg = cls(vm, kernel)
            dg.tools = vm.attach(disk, read_only=True, serial="dockertools")
            vm.sh(GUEST_SETUP.replace("$1", shlex.quote(dg.tools.guest_path)), timeout=120)
        except BaseException:
            vm.close()
            raise
        return dg

    def __enter__(self) -> DockerGuest:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.vm._failed = True
        elif self.data is None:
            # Nothing left to write back: the tools disk is read-only, the transfer and
            # hashing disks are holes, the data disks are unmounted (their writes are in their
            # files: ``stop``). QEMU goes at once rather than after a detach per disk
            # (``Machine.shutdown``: ~0.2 s of the guest's CPU each under TCG); after a
            # failure the orderly shutdown keeps what the guest wrote for the post-mortem.
            self.vm.kill()
        self.vm.close()
        if self.xfer is not None:  # a hole, but the run directory may be kept
            self.xfer.host_path.unlink(missing_ok=True)

    def lvm_setup(self, pvs: Sequence[Disk]) -> None:
        """Make lvm2 (on the tools disk) usable on the disks *pvs* only: lvm.conf as
        dmimage.guest.lvm2's appliance has it (no udev, no lvmetad, no backups), with its
        filter narrowed to *pvs* (the other disks are the tools, data-root, transfer and
        hashing disks, never PVs) and thin_check from the tools disk; and lvm2's run
        directories."""
        accept = ", ".join(f'"a|^{re.escape(d.guest_path)}$|"' for d in pvs)
        conf = re.sub(r"filter = \[.*\]", f'filter = [ {accept}, "r|.*|" ]', LVM_CONF)
        conf = conf.replace('"/sbin/thin_check"', f'"{MOUNT}/bin/thin_check"')
        if f"{MOUNT}/bin/thin_check" not in conf or accept not in conf:
            raise ApplianceError("lvm.conf: no filter or thin_check line to adapt")
        dirs = " ".join(f"/{d}" for d in RUN_DIRS)
        self.sh(f"mkdir -p /etc/lvm {dirs} && cat > /etc/lvm/lvm.conf <<'EOF'\n{conf}EOF\n")

    def sh(self, command: str, *, timeout: float = 120.0) -> str:
        """Run *command* with the Docker tools on PATH; raise unless it exits 0."""
        return self.vm.sh(ENV + command, timeout=timeout)

    def docker(self, args: str, *, timeout: float = 180.0) -> str:
        return self.sh(f"docker {args}", timeout=timeout)

    def _data_disk(self, path: Path) -> Disk:
        """*path* attached read-write, once per guest: a hot-plug and a hot-unplug each cost
        the guest ~0.3 s of CPU under TCG (ACPI, a PCI rescan, the virtio probe), and a store
        is often started again (a restart after a kill). Unmounted, a data disk's writes are
        in its file already (QEMU writes the guest's completed writes straight to it), so the
        host reads it while it stays attached. QEMU holds the file it opened: a new file at
        the same path (another inode) is attached afresh, the old one detached."""
        key = Path(path).resolve()
        st = key.stat()
        ident = (st.st_dev, st.st_ino)
        held = self.data_disks.get(key)
        if held is not None and held[1] != ident:
            self.vm.detach(held[0])
            held = None
        if held is None:
            self._data_serial += 1
            held = self.data_disks[key] = (
                self.vm.attach(key, read_only=False, serial=f"dockerdata{self._data_serial}"),
                ident)
        return held[0]

    def start(self, data_disk: Path, *, extra_opts: tuple[str, ...] = (),
              timeout: float = 120.0) -> None:
        """Attach *data_disk* read-write (once per guest: ``_data_disk``; the guest's cached
        pages of it are dropped, so it reads what the host may have changed since), mount it
        on /var/lib/docker and start dockerd, in one guest command.

        containerd is started first and waited for (its socket), then handed to dockerd with
        ``--containerd``: dockerd's own wait for the containerd it would spawn has a fixed limit
        that a loaded TCG guest can miss ("timeout waiting for containerd to start"). It holds
        nothing of the data root (no containers run), so it keeps running for the next dockerd
        of this guest (a restart on a killed store, the next scenario) instead of being started
        again (~1 s of the guest's CPU). dockerd is ready when its API answers ``/_ping``: its
        socket is created when it starts serving, and the loop waits for it with no process
        started per turn; the docker CLI's start-up would take the guest's only vCPU from
        dockerd's for ~1 s per try."""
        self.data = self._data_disk(data_disk)
        opts = " ".join(f"--storage-opt {o}" for o in storage_opts(extra_opts))
        ticks = int(timeout * 10)
        fail = "{ tail -n 30 /tmp/%s.log >&2; exit 1; }"
        wait = f"read -t 0.1 x <> {WAIT_FIFO}"
        xfs = f"{MOUNT}/modules/xfs.ko"
        load_xfs = (f"[ -d /sys/module/xfs ] || [ ! -e {xfs} ] || insmod {xfs} || exit 1\n"
                    if "dm.fs=xfs" in extra_opts else "")
        self.sh(f"{load_xfs}"
                f"blockdev --flushbufs {self.data.guest_path} && mkdir -p {DATA_ROOT} && "
                f"mount -t ext4 {self.data.guest_path} {DATA_ROOT} || "
                "exit 1\n"
                "if ! { read -r c < /tmp/containerd.pid && kill -0 $c; } 2>/dev/null; then\n"
                f"mkdir -p {CONTAINERD_SOCK.rsplit('/', 1)[0]}\n"
                f"cat > /tmp/containerd.toml <<'EOF'\n{CONTAINERD_TOML}EOF\n"
                "setsid containerd --config /tmp/containerd.toml </dev/null "
                ">/tmp/containerd.log 2>&1 & c=$!; echo $c > /tmp/containerd.pid\n"
                f"i=0; until [ -S {CONTAINERD_SOCK} ]; do i=$((i+1)); "
                f"[ $i -lt {ticks} ] && kill -0 $c 2>/dev/null || {fail % 'containerd'}; "
                f"{wait}; done\n"
                "fi\n"
                "rm -f /run/docker.sock /run/docker.pid  # what a killed dockerd left\n"
                f"setsid dockerd --data-root {DATA_ROOT} --storage-driver devicemapper {opts} "
                f"--containerd {CONTAINERD_SOCK} -H unix:///run/docker.sock -H tcp://{API} "
                "--tls=false "
                "--iptables=false --ip-masq=false --bridge=none --log-level=debug "
                "</dev/null >/tmp/dockerd.log 2>&1 & p=$!; echo $p > /tmp/dockerd.pid\n"
                "i=0; until [ -S /run/docker.sock ] && "
                f"wget -q -O /dev/null http://{API}/_ping 2>/dev/null; do i=$((i+1)); "
                f"[ $i -lt {ticks} ] && kill -0 $p 2>/dev/null || {fail % 'dockerd'}; "
                f"{wait}; done; true", timeout=timeout + 10)

    def api(self, *paths: str, timeout: float = 120.0) -> list[Any]:
        """GET each of *paths* from dockerd's Engine API (busybox wget on the guest's
        loopback) and return the decoded JSON bodies. The read-only queries the tests make
        (inspect, diff, ls) answer with the same JSON the docker CLI prints, without the
        CLI's start-up (about a second of the guest's CPU under TCG, per call)."""
        if not paths:
            return []
        mark = "--dmimage-api--"
        script = "; ".join(f"wget -q -O - {shlex.quote(f'http://{API}/v1.41{p}')} && "
                           f"echo && echo {mark}" for p in paths)
        out = self.sh(script, timeout=timeout)
        parts = out.split(f"\n{mark}\n")
        if len(parts) != len(paths) + 1 or parts[-1].strip():
            raise ApplianceError(f"dockerd API: {len(parts) - 1} answers to {len(paths)} "
                                 f"requests: {out[-300:]!r}")
        return [json.loads(x) for x in parts[:-1]]

    def fetch(self, *paths: str, timeout: float = 600.0) -> list[bytes]:
        """GET each of *paths* from dockerd's Engine API (busybox wget) and return the bodies,
        in one guest command through the transfer disk: ``docker save``, ``docker export`` and
        ``docker cp`` out of a container are ``GET /images/get``, ``GET
        /containers/ID/export`` and ``GET /containers/ID/archive`` (the CLI writes the same
        bytes, or for cp extracts that tar)."""
        if not paths:
            return []
        names = [f"/tmp/fetch.{i}" for i in range(len(paths))]
        before = "\n".join(f"wget -q -O {n} {shlex.quote(f'http://{API}/v1.41{p}')}"
                           for n, p in zip(names, paths, strict=True))
        return self.get_many(names, before=f"rm -f /tmp/fetch.*\n{before}", remove=True,
                             timeout=timeout)

    #: The transfer disk: a sparse file in the machine's run directory, attached once.
    XFER_BYTES = 1 << 30

    def _xfer(self) -> Disk:
        """The transfer disk (attached on first use, for the guest's lifetime): ``put`` and
        ``get`` move files through it with one guest command each, where a disk image made and
        hot-plugged per transfer costs a ``mke2fs``, an attach and a detach (~1-2 s under load);
        base64 through the agent costs seconds per 100 KB under TCG."""
        if self.xfer is None:
            assert self.vm.rundir is not None
            path = self.vm.rundir / "docker-xfer.img"
            with open(path, "wb") as f:
                f.truncate(self.XFER_BYTES)
            self.xfer = self.vm.attach(path, read_only=False, serial="dockerxfer")
        return self.xfer

    def _xfer_done(self) -> None:
        """Back to a hole (no host space); the next transfer writes before anything reads."""
        assert self.xfer is not None
        os.truncate(self.xfer.host_path, 0)
        os.truncate(self.xfer.host_path, self.XFER_BYTES)

    def _put_script(self, files: Mapping[str, Path]) -> str:
        """Write host *files* into the transfer disk's file; return the guest commands that
        copy them out to their guest paths (``put``)."""
        disk = self._xfer()
        dev = disk.guest_path
        cmds = [f"blockdev --flushbufs {dev}"]
        off = 0
        with open(disk.host_path, "r+b") as f:
            for guest, host in files.items():
                data = Path(host).read_bytes()
                if off + len(data) > self.XFER_BYTES:
                    raise ApplianceError(f"{host}: the files to put exceed the transfer "
                                         f"disk's {self.XFER_BYTES} bytes")
                os.pwrite(f.fileno(), data, off)
                cmds.append(f"dd if={dev} of={shlex.quote(guest)} bs=1048576 skip={off} "
                            f"count={len(data)} iflag=skip_bytes,count_bytes,fullblock "
                            "status=none")
                off = -(-(off + len(data)) // (1 << 20)) << 20
        return " && ".join(cmds) + " || exit 1"

    def put(self, files: Mapping[str, Path]) -> None:
        """Copy host *files* to the guest (``{guest path: host path}``): the host writes them
        into the transfer disk's file, the guest drops its cached pages of the disk
        (``blockdev --flushbufs``) and copies each out with ``dd``."""
        try:
            self.sh(self._put_script(files))
        finally:
            self._xfer_done()

    def get_many(self, guest_paths: Sequence[str], *, before: str = "", remove: bool = False,
                 timeout: float = 600.0) -> list[bytes]:
        """The bytes of the guest's files *guest_paths*, in one guest command (after the
        commands *before*; with *remove*, the files are removed after): the guest writes them
        into the transfer disk, 1 MiB-aligned, and flushes them to it (``blockdev
        --flushbufs``); the host reads them from its file."""
        disk = self._xfer()
        dev = disk.guest_path
        lines = ["set -e", before, "set +e", "o=0"]
        for p in guest_paths:
            q = shlex.quote(p)
            lines.append(f"n=$(stat -c %s {q}) && [ $((o + n)) -le {self.XFER_BYTES} ] && "
                         f"dd if={q} of={dev} bs=1048576 seek=$o oflag=seek_bytes conv=notrunc "
                         "status=none && echo $o $n && o=$(( (o + n + 1048575) / 1048576 * "
                         "1048576 )) || exit 1")
        lines.append(f"blockdev --flushbufs {dev}")
        if remove:
            lines.append(f"rm -f {' '.join(shlex.quote(p) for p in guest_paths)}")
        try:
            out = self.sh("\n".join(lines), timeout=timeout).split()
            if len(out) != 2 * len(guest_paths):
                raise ApplianceError(f"get {list(guest_paths)}: answers {out!r}")
            with open(disk.host_path, "rb") as f:
                return [os.pread(f.fileno(), int(n), int(o)) for o, n in
                        zip(out[0::2], out[1::2], strict=True)]
        finally:
            self._xfer_done()

    def get(self, guest_path: str) -> bytes:
        """The bytes of the guest's file *guest_path* (``get_many``)."""
        return self.get_many([guest_path])[0]

    def calls(self, calls: Sequence[Call], *, files: Mapping[str, Path] | None = None,
              timeout: float = 600.0) -> list[Reply]:
        """Send *calls* to dockerd's Engine API, in order, in one guest command (the client
        is ``API_CLIENT``: a few busybox processes per call, where the docker CLI's start-up
        alone costs about a second of the guest's CPU under TCG) and return dockerd's
        answers; *files* are ``put`` first, in the same command. The first call that fails
        stops the run and raises ``ApplianceError`` naming its command and dockerd's answer;
        a refusal of a call with ``refusal_ok`` is returned like any answer."""
        if not calls:
            return []
        lines = [API_CLIENT]
        if files:
            try:
                lines.append(self._put_script(files))
            except BaseException:
                self._xfer_done()
                raise
        for i, c in enumerate(calls, 1):
            body = c.body or ""
            if c.data is not None:
                body = f"/tmp/api/b{i:03d}"
                lines.append(f"printf %s {shlex.quote(c.data)} > {body}")
            args = (f"{i:03d}", c.method, c.path, body, c.ctype or "",
                    "1" if c.refusal_ok else "0")
            lines.append(f"dreq {' '.join(map(shlex.quote, args))} || "
                         f"{{ cat /tmp/api/[0-9]*; echo {i} >&2; exit 3; }}")
        lines.append("cat /tmp/api/[0-9]*")
        try:
            res = self.vm.run(ENV + "\n".join(lines), timeout=timeout)
        finally:
            if files:
                self._xfer_done()
        try:
            got = _parse_replies(res.stdout)
        except ApplianceError:
            got = {}
        if res.ok and len(got) == len(calls):
            return [got[i] for i in range(1, len(calls) + 1)]
        failed = int(res.err.split()[-1]) if res.returncode == 3 and res.err.split() else 0
        if 0 < failed <= len(calls):
            r = got.get(failed)
            answer = (f"dockerd answered {r.status}: {r.body.decode(errors='replace')[-500:]}"
                      if r is not None else f"no answer: {res.stdout[-300:]!r}")
            raise ApplianceError(f"docker {calls[failed - 1].label}: {answer}")
        raise ApplianceError(f"dockerd API: {len(calls)} calls, rc {res.returncode}, "
                             f"{len(got)} answers: {res.stdout[-300:]!r} {res.err[-300:]!r}")

    def log(self) -> str:
        """dockerd's log, then containerd's."""
        return self.vm.run("cat /tmp/dockerd.log; echo '--- containerd'; "
                           "cat /tmp/containerd.log", timeout=30).out

    def stop(self, *, kill: bool = False, unmount: bool = True, timeout: float = 120.0) -> None:
        """Stop dockerd (SIGTERM, or SIGKILL with *kill*); then unmount the data disk unless
        *unmount* is false (``unmount_data`` does it later). containerd keeps running
        (``start``)."""
        sig = "KILL" if kill else "TERM"
        script = (f"read -r p < /tmp/dockerd.pid; kill -{sig} $p; i=0; "
                  f"while kill -0 $p 2>/dev/null; do i=$((i+1)); [ $i -lt {int(timeout * 10)} ] "
                  f"|| exit 1; read -t 0.1 x <> {WAIT_FIFO}; done; true")
        if kill:
            # A killed dockerd leaves its re-executed helpers (argv[0] docker-applyLayer,
            # docker-untar...: an import killed mid-way can have one still writing the layer,
            # which keeps the data root busy), its mounts, the pool's dm devices and the loop
            # devices. busybox has no pkill: each /proc/PID/cmdline is read by ash, which
            # drops its NULs, so the words run together and argv[0] starts them. A helper is
            # waited for until init has reaped it, not only until its cmdline stops matching:
            # dockerd starts them with a parent-death SIGTERM (reexec.Command), so they are
            # often dying by now, and a dying helper's leader thread can be gone (state Z,
            # cmdline empty) while its other threads still hold the layer's device, chroot and
            # mount namespace. Its comm stays "exe" (dockerd executes /proc/self/exe) until
            # the reap, so a process counts while its cmdline or comm starts with docker- or
            # its comm is exe (a stand-in whose helper held a dm device from a thread in a
            # read: the cmdline-only loop went on at once and the device stayed busy, 3 of 3).
            script += (
                "\ni=0; while :; do n=0; for d in /proc/[0-9]*; do c=; a=; read -r c < $d/comm; "
                "read -r a < $d/cmdline; case $c:$a in exe:*|docker-*|*:docker-*) "
                "kill -KILL ${d#/proc/}; n=$((n+1));; esac; done 2>/dev/null; "
                "[ $n -gt 0 ] && [ $i -lt 100 ] || break; i=$((i+1)); "
                f"read -t 0.1 x <> {WAIT_FIFO}; done"
                f"\ngrep ' {DATA_ROOT}/' /proc/mounts | cut -d' ' -f2 | sort -r | "
                "xargs -r umount; dmsetup remove_all; for l in /dev/loop*; do "
                "losetup -d $l; done 2>/dev/null; true")
        if unmount:
            script += "\n" + self._unmount()
        self.sh(script, timeout=timeout + 70)
        if unmount:
            self.data = None

    def _unmount(self) -> str:
        """The guest commands that unmount /var/lib/docker and write back what the guest still
        holds of its disk: then the disk's file holds every write (``_data_disk``)."""
        assert self.data is not None
        return f"sync; umount {DATA_ROOT} && blockdev --flushbufs {self.data.guest_path}"

    def unmount_data(self, *, before: str = "") -> None:
        """Unmount /var/lib/docker (after the commands *before*, in the same guest command):
        the data disk's file then holds every write; the disk stays attached (``_data_disk``)."""
        self.sh(f"{before}\n{self._unmount()}")
        self.data = None
