"""Debian 12's dockerd 20.10 with the devicemapper driver, running in the guest.

The Docker binaries are not put into the initramfs: they travel on a read-only ext4 "tools
disk" built without root (``mke2fs -d``) and cached by content hash, next to the libraries
``ldd`` names, e2fsprogs' mkfs.ext4/tune2fs, util-linux's blkid (deviceset.go runs all three)
and the ``loop`` module. The .debs come from Debian 12 (``apt-get download`` into the cache,
``dpkg-deb -x``); nothing is installed on the host.

dockerd starts in about a second under TCG with loop-lvm, ``dm.fs=ext4``,
``dm.override_udev_sync_check=true``, ``--iptables=false --bridge=none``, its data root on an
ext4 virtio disk, /var/run linked to /run and cgroup2 mounted. Small loop files keep the data
root small: ``dm.loopdatasize``, ``dm.loopmetadatasize`` and ``dm.basesize``.

    with DockerGuest.boot("deb12") as dg:
        dg.start(data_disk_path)
        dg.docker("import /tmp/a.tar img:1")
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
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from dmimage.guest.appliance import ApplianceError, cache_root, read_module
from dmimage.guest.kernels import Kernel, kernel_by_name
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
)

#: Modules dockerd's devicemapper driver needs beyond the appliance's (dm-thin-pool, ext4).
MODULES = ("loop", "xfs")

#: Guest memory: dockerd and containerd together take a few hundred MB.
MEMORY_MB = 1024

#: The storage options every test uses: 128 MiB data, 16 MiB metadata, 16 MiB devices (each
#: device is hashed whole in the guest: small devices keep that quick under TCG).
STORAGE_OPTS = ("dm.fs=ext4", "dm.override_udev_sync_check=true", "dm.loopdatasize=128M",
                "dm.loopmetadatasize=16M", "dm.basesize=16M", "dm.min_free_space=0%")

MOUNT = "/opt/docker"
DATA_ROOT = "/var/lib/docker"


class DockerUnavailable(ApplianceError):
    """The Docker packages cannot be fetched or unpacked."""


def debs_root(*, fetch: bool = True) -> Path:
    """The unpacked Debian 12 packages (``<cache>/docker-debs/root``), fetched when a file
    the guest needs is missing (a cache from before a package was added is refreshed)."""
    base = cache_root() / "docker-debs"
    root = base / "root"
    if all((root / r).exists() for r in REQUIRED):
        return root
    if not fetch:
        raise DockerUnavailable(f"{root}: Docker packages not unpacked")
    base.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["apt-get", "-o", "APT::Sandbox::User=root", "download", *PACKAGES],
                         cwd=base, capture_output=True, text=True, check=False)
    debs = []
    for pkg in PACKAGES:
        found = sorted(base.glob(f"{pkg}_*.deb"), key=lambda p: p.stat().st_mtime)
        if res.returncode != 0 or not found:
            raise DockerUnavailable(f"apt-get download {' '.join(PACKAGES)} failed: "
                                    f"{res.stderr.strip()[-500:]}")
        debs.append(found[-1])
    tmp = Path(tempfile.mkdtemp(prefix="root.", dir=base))
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root


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
        path = debs / p if kind == "debs" else Path(p)
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
mkdir -p /lib/x86_64-linux-gnu
for l in {MOUNT}/lib/*; do
  [ -e "/lib/x86_64-linux-gnu/${{l##*/}}" ] || ln -s "$l" /lib/x86_64-linux-gnu/
done
for m in {MOUNT}/modules/*.ko; do
  [ -e "$m" ] || continue
  grep -q "^$(basename "$m" .ko) " /proc/modules || insmod "$m"
done
# Read the big binaries into the page cache while the host prepares the data disk (the first
# start otherwise waits seconds for them).
(cat {MOUNT}/bin/dockerd {MOUNT}/bin/containerd {MOUNT}/bin/docker >/dev/null 2>&1 &)
"""

#: containerd's configuration: what dockerd writes for the containerd it manages (the CRI
#: plugin off), with the data root's state and socket paths.
CONTAINERD_SOCK = "/run/docker/containerd/containerd.sock"
CONTAINERD_TOML = f"""version = 2
root = "{DATA_ROOT}/containerd/daemon"
state = "/run/docker/containerd/daemon"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{CONTAINERD_SOCK}"
[debug]
  level = "debug"
"""

ENV = f"export PATH={MOUNT}/bin:/sbin:/bin DOCKER_HOST=unix:///run/docker.sock; "

#: dockerd also serves its API here, inside the guest only, for ``DockerGuest.api``
#: (``--tls=false`` said explicitly: dockerd 20.10 otherwise delays its start to warn).
API = "127.0.0.1:2375"


class DockerGuest:
    """A booted guest with the tools disk mounted; ``start``/``stop`` dockerd on a data disk."""

    def __init__(self, machine: Machine, kernel: Kernel) -> None:
        self.vm = machine
        self.kernel = kernel
        self.tools: Disk | None = None
        self.data: Disk | None = None

    @classmethod
    def boot(cls, kernel_name: str = "deb12", *, lvm: bool = False) -> DockerGuest:
        """With *lvm*, the appliance carries lvm2 too (a direct-lvm pool for
        ``dm.thinpooldev``)."""
        kernel = kernel_by_name(kernel_name)
        disk = tools_disk(kernel)
        if lvm:
            from dmimage.guest.lvm2 import LvmMachine

            vm: Machine = LvmMachine(kernel, memory_mb=MEMORY_MB).start()
        else:
            vm = Machine(kernel, memory_mb=MEMORY_MB).start()
        try:
            dg = cls(vm, kernel)
            if lvm:
                vm.lvm_setup()  # type: ignore[attr-defined]
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
        self.vm.close()

    def sh(self, command: str, *, timeout: float = 120.0) -> str:
        """Run *command* with the Docker tools on PATH; raise unless it exits 0."""
        return self.vm.sh(ENV + command, timeout=timeout)

    def docker(self, args: str, *, timeout: float = 180.0) -> str:
        return self.sh(f"docker {args}", timeout=timeout)

    def start(self, data_disk: Path, *, extra_opts: tuple[str, ...] = (),
              timeout: float = 120.0) -> None:
        """Attach *data_disk* read-write, mount it on /var/lib/docker and start dockerd.

        containerd is started first and waited for here (its socket), then handed to dockerd
        with ``--containerd``: dockerd's own wait for the containerd it would spawn has a fixed
        limit that a loaded TCG guest can miss ("timeout waiting for containerd to start").
        Readiness is read from dockerd's log ("API listen on"), not polled with the docker CLI,
        whose start-up takes the guest's only vCPU from dockerd's for ~1 s per try."""
        self.data = self.vm.attach(data_disk, read_only=False, serial="dockerdata")
        opts = " ".join(f"--storage-opt {o}" for o in (*STORAGE_OPTS, *extra_opts))
        self.sh(f"mkdir -p {DATA_ROOT} && mount -t ext4 {self.data.guest_path} {DATA_ROOT}")
        ticks = int(timeout * 10)
        fail = "{ tail -n 30 /tmp/%s.log >&2; exit 1; }"
        self.sh(f"mkdir -p {CONTAINERD_SOCK.rsplit('/', 1)[0]} && "
                f"cat > /tmp/containerd.toml <<'EOF'\n{CONTAINERD_TOML}EOF\n"
                "setsid containerd --config /tmp/containerd.toml </dev/null "
                ">/tmp/containerd.log 2>&1 & echo $! > /tmp/containerd.pid; "
                f"i=0; until [ -S {CONTAINERD_SOCK} ]; do i=$((i+1)); "
                f"[ $i -lt {ticks} ] || {fail % 'containerd'}; "
                "kill -0 $(cat /tmp/containerd.pid) 2>/dev/null || "
                f"{fail % 'containerd'}; sleep 0.1; done", timeout=timeout + 10)
        self.sh(f"setsid dockerd --data-root {DATA_ROOT} --storage-driver devicemapper {opts} "
                f"--containerd {CONTAINERD_SOCK} -H unix:///run/docker.sock -H tcp://{API} "
                "--tls=false "
                "--iptables=false --ip-masq=false --bridge=none --log-level=debug "
                "</dev/null >/tmp/dockerd.log 2>&1 & echo $! > /tmp/dockerd.pid; "
                f"i=0; until grep -q 'API listen on' /tmp/dockerd.log; do i=$((i+1)); "
                f"[ $i -lt {ticks} ] || {fail % 'dockerd'}; "
                "kill -0 $(cat /tmp/dockerd.pid) 2>/dev/null || "
                f"{fail % 'dockerd'}; sleep 0.1; done",
                timeout=timeout + 10)

    def put(self, files: Mapping[str, Path], work: Path) -> None:
        """Copy host *files* to the guest (``{guest path: host path}``) through a small ext4
        image (``mke2fs -d``) attached read-only: base64 through the agent costs seconds per
        100 KB under TCG, a hot-plug well under one."""
        stage = Path(tempfile.mkdtemp(prefix="put.", dir=work))
        try:
            total = 0
            for i, host in enumerate(files.values()):
                shutil.copyfile(host, stage / str(i))
                total += host.stat().st_size
            img = stage.with_suffix(".ext4")
            with open(img, "wb") as f:
                f.truncate((total * 5 // 4 + (4 << 20)) // 4096 * 4096)
            subprocess.run(["mke2fs", "-q", "-t", "ext4", "-F", "-m", "0", "-O", "^has_journal",
                            "-d", str(stage), str(img)], check=True, capture_output=True)
            cps = " && ".join(f"cp /tmp/put/{i} {shlex.quote(g)}" for i, g in enumerate(files))
            with self.vm.disk(img, read_only=True, serial="dockerput") as d:
                self.sh(f"mkdir -p /tmp/put && mount -t ext4 -o ro {d.guest_path} /tmp/put && "
                        f"{{ {cps}; }}; r=$?; umount /tmp/put; exit $r")
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            stage.with_suffix(".ext4").unlink(missing_ok=True)

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

    def download(self, path: str, dest: str, *, timeout: float = 900.0) -> None:
        """GET *path* from dockerd's Engine API into the guest file *dest* (``docker save``
        and ``docker export`` are ``GET /images/get`` and ``GET /containers/ID/export``: the
        CLI writes the same bytes)."""
        self.sh(f"wget -q -O {shlex.quote(dest)} {shlex.quote(f'http://{API}/v1.41{path}')}",
                timeout=timeout)

    def get(self, guest_path: str, work: Path) -> bytes:
        """The bytes of the guest's file *guest_path*, through a raw disk image the guest
        writes (the reverse of ``put``; base64 through the agent is slow under TCG)."""
        size = int(self.sh(f"stat -c %s {shlex.quote(guest_path)}"))
        fd, name = tempfile.mkstemp(prefix="get.", suffix=".raw", dir=work)
        raw = Path(name)
        try:
            os.ftruncate(fd, max(512, -(-size // 512) * 512))
            os.close(fd)
            with self.vm.disk(raw, read_only=False, serial="dockerget") as d:
                self.sh(f"cat {shlex.quote(guest_path)} > {d.guest_path} && sync")
            with open(raw, "rb") as f:
                return f.read(size)
        finally:
            raw.unlink(missing_ok=True)

    def log(self) -> str:
        """dockerd's log, then containerd's."""
        return self.vm.run("cat /tmp/dockerd.log; echo '--- containerd'; "
                           "cat /tmp/containerd.log", timeout=30).out

    def stop(self, *, kill: bool = False, unmount: bool = True, timeout: float = 120.0) -> None:
        """Stop dockerd (SIGTERM, or SIGKILL with *kill*); then unmount and detach the data
        disk unless *unmount* is false (``detach_data`` does it later)."""
        sig = "KILL" if kill else "TERM"
        self.sh(f"p=$(cat /tmp/dockerd.pid); kill -{sig} $p; i=0; "
                f"while kill -0 $p 2>/dev/null; do i=$((i+1)); [ $i -lt {int(timeout * 5)} ] "
                "|| exit 1; sleep 0.2; done", timeout=timeout + 10)
        # containerd is ours (``start``), not dockerd's; it holds nothing on the pool.
        self.vm.run("p=$(cat /tmp/containerd.pid) && kill -TERM $p && i=0 && "
                    "while kill -0 $p 2>/dev/null && [ $i -lt 100 ]; do i=$((i+1)); sleep 0.1; "
                    "done", timeout=30)
        if kill:
            # A killed dockerd leaves its mounts, the pool's dm devices and the loop devices.
            self.vm.run(f"grep ' {DATA_ROOT}/' /proc/mounts | cut -d' ' -f2 | sort -r | "
                        "xargs -r umount; dmsetup remove_all; for l in /dev/loop*; do "
                        "losetup -d $l; done 2>/dev/null; true", timeout=60)
        if unmount:
            self.detach_data()

    def detach_data(self) -> None:
        """Unmount /var/lib/docker and hot-unplug the data disk (its writes reach the host)."""
        self.sh(f"sync; umount {DATA_ROOT}")
        assert self.data is not None
        self.vm.detach(self.data)
        self.data = None
