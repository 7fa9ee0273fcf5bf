"""The guest appliance: an initramfs built in pure Python, no root needed on the host.

Contents: busybox-static (applets as symlinks), dmsetup plus the shared libraries `ldd` names and
the dynamic loader, the kernel modules the thin-pool target needs (dependency order from
modules.dep, `.ko.xz` decompressed on the host), ``/init`` and the guest agent (a busybox sh
script speaking a line protocol on a virtio-serial port, see ``agent.py``).

The archive is cached by content hash under ``$XDG_CACHE_HOME/dmimage/appliance`` (default
``~/.cache/dmimage``), so a second run of the same kernel reuses it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dmimage.errors import DmimageError

#: Modules the guest loads, in this order after their dependencies (names as in modules.dep,
#: `-` and `_` equivalent). Built-in ones (modules.builtin) are skipped.
GUEST_MODULES = (
    "crc32c_generic",  # libcrc32c only soft-depends on "crc32c": load a provider first
    "libcrc32c",
    "virtio_pci",
    "virtio_blk",
    # The agent's channel: a virtio-serial port (a module on 5.10 and 6.1, built in later).
    "virtio_console",
    "dm-mod",
    "dm-bufio",
    "dm-bio-prison",
    "dm-persistent-data",
    "dm-thin-pool",
    # `dmimage build` proofs mount the ext4 volumes they build: ext4 and its dependencies
    # from modules.dep (jbd2, mbcache, crc16) on Debian 12 and 13, where all are modules.
    "ext4",
    # The other device-mapper targets `dmimage table` models, so the VM suite's table tests
    # can load every one of them; dm-snapshot, dm-cache and dm-era also carry the
    # exception-store, cache and era proofs (dm-snapshot is also what lvm2's snapshots need).
    "dm-zero",
    "dm-crypt",
    "dm-delay",
    "dm-flakey",
    "dm-snapshot",
    "dm-verity",
    "dm-cache",
    "dm-cache-smq",
    "dm-era",
)

#: For a machine with a host share (``Machine(host_share=...)``): virtio-9p and the 9p
#: filesystem (with netfs/fscache as modules.dep says). Off unless a test asks for the share.
HOST_SHARE_MODULES = ("9pnet_virtio", "9p")

#: The crypto API algorithms the crypt and verity tables of the VM tests name, each with the
#: modules that may provide it. The guest has no modprobe, so the kernel cannot load one on
#: demand: each must be built in or in the appliance. Which is which differs: 5.10 builds aes
#: (aes_generic) and cbc as modules, 6.1 and later build them in; xts and essiv are modules
#: everywhere; ecb is a module on 5.10 and 6.1; crypto_null (cipher_null) is built into 5.10
#: and 6.1, a module from 6.12; 7.x renamed aes_generic, sha1_generic, sha256_generic to
#: aes, sha1, sha256 (all built in).
CRYPTO_PROVIDERS: dict[str, tuple[str, ...]] = {
    "aes": ("aes_generic", "aes"),
    "cbc": ("cbc",),
    "ecb": ("ecb",),
    "xts": ("xts",),
    "essiv": ("essiv",),
    "cipher_null": ("crypto_null",),
    "sha1": ("sha1_generic", "sha1"),
    "sha256": ("sha256_generic", "sha256"),
}

#: Optional: loaded when present (faster crc32c with SSE4.2, which `-cpu max`/`host` offers),
#: and those of the crypto providers above that some kernel ships as a module.
OPTIONAL_MODULES = ("crc32c-intel", "aes_generic", "cbc", "ecb", "xts", "essiv", "crypto_null")

#: Modules of GUEST_MODULES that newer kernels no longer have, because what they did moved into
#: the core: from 6.15 on crc32c is a library function of the built-in lib/crc code, so 7.x has
#: neither libcrc32c nor crc32c_generic, and dm-persistent-data depends on neither. Skipped
#: when a kernel has no such module (loadable or built in); every other missing one is an error.
FOLDED_INTO_CORE = frozenset({"crc32c_generic", "libcrc32c"})

BUSYBOX_CANDIDATES = ("/usr/bin/busybox", "/bin/busybox")
DMSETUP_CANDIDATES = ("/usr/sbin/dmsetup", "/sbin/dmsetup")


class ApplianceError(DmimageError):
    """The guest initramfs cannot be built (missing busybox, dmsetup, module, ...)."""


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/dmimage`` (default ``~/.cache/dmimage``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dmimage"


# --------------------------------------------------------------------------------------------
# cpio "newc" writer


class CpioWriter:
    """Writes a cpio archive in the SVR4 "newc" format (magic 070701), as the kernel unpacks.

    Entries are written in call order; parents must be added before children. Every entry is
    owned by root with mtime 0, so the same inputs give the same bytes.
    """

    TRAILER = "TRAILER!!!"

    def __init__(self, fileobj: io.BufferedIOBase) -> None:
        self._f = fileobj
        self._ino = 1
        self._closed = False

    def _entry(self, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        name = name.lstrip("/") or "."
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0,
        )
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._ino += 1
        out = header + encoded
        out += b"\0" * (-len(out) % 4)
        self._f.write(out)
        if data:
            self._f.write(data)
            self._f.write(b"\0" * (-len(data) % 4))

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def close(self) -> None:
        if not self._closed:
            self._entry(self.TRAILER, 0, nlink=1)
            self._closed = True


# --------------------------------------------------------------------------------------------
# Kernel modules


def _modname(path_or_name: str) -> str:
    base = os.path.basename(path_or_name)
    base = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base)
    return base.replace("-", "_")


def read_modules_dep(moddir: Path) -> dict[str, tuple[str, list[str]]]:
    """modules.dep as ``{modname: (relative path, [dependency paths])}``."""
    dep_file = moddir / "modules.dep"
    if not dep_file.exists():
        raise ApplianceError(f"{dep_file} is missing (run depmod -b on the unpacked tree)")
    table: dict[str, tuple[str, list[str]]] = {}
    for line in dep_file.read_text().splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        table[_modname(path)] = (path, deps.split())
    return table


def read_builtin(moddir: Path) -> set[str]:
    f = moddir / "modules.builtin"
    return {_modname(p) for p in f.read_text().split()} if f.exists() else set()


def resolve_modules(moddir: Path, wanted: Iterable[str] = GUEST_MODULES,
                    optional: Iterable[str] = OPTIONAL_MODULES) -> list[str]:
    """Relative module paths to load, dependencies first, each once; built-ins left out."""
    dep = read_modules_dep(moddir)
    builtin = read_builtin(moddir)
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in chain:
            raise ApplianceError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        path, deps = dep[name]
        for d in deps:
            visit(_modname(d), chain + (name,))
        seen.add(name)
        order.append(path)

    for mod in wanted:
        name = _modname(mod)
        if name in dep:
            visit(name, ())
        elif name not in builtin and name not in FOLDED_INTO_CORE:
            raise ApplianceError(f"kernel module {mod} is neither in {moddir}/modules.dep "
                                 "nor built in")
    for mod in optional:
        name = _modname(mod)
        if name in dep:
            visit(name, ())
    return order


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return _unzstd(path, data)
    return data


#: The trailer of a signed module (kernel scripts/sign-file): the signature, then a
#: 12-byte ``struct module_signature`` (its last field the signature's length, big-endian),
#: then this magic.
MODULE_SIG_MAGIC = b"~Module signature appended~\n"


def strip_signature(data: bytes) -> bytes:
    """A module without its appended signature. The kernel then loads it unverified (it
    logs "module verification failed" once, at notice level, and taints itself with E; no
    Debian kernel sets MODULE_SIG_FORCE): verifying means a sha256 of every module and an
    RSA check, which cost a TCG guest's cold boot ~0.7 QEMU CPU-s (docs/vm.md). Only for a
    kernel that does not force signatures (:func:`signatures_optional`)."""
    if not data.endswith(MODULE_SIG_MAGIC):
        return data
    end = len(data) - len(MODULE_SIG_MAGIC)
    if end < 12:
        return data
    sig_len = int.from_bytes(data[end - 4:end], "big")
    start = end - 12 - sig_len
    return data[:start] if start >= 0 else data


def signatures_optional(moddir: Path) -> bool:
    """Whether the kernel of *moddir* loads unsigned modules: its build config is found (in
    the module directory, or ``boot/config-<version>`` of the tree holding
    ``[usr/]lib/modules/<version>``) and does not set ``CONFIG_MODULE_SIG_FORCE``. A kernel
    that forces signatures, or one whose config is not found, keeps its modules' signatures:
    stripped, they would not load (no agent port, no dm targets)."""
    version = moddir.name
    candidates = [moddir / "config"]
    if moddir.parent.name == "modules" and moddir.parent.parent.name == "lib":
        root = moddir.parent.parent.parent
        if root.name == "usr":
            candidates.append(root.parent / "boot" / f"config-{version}")
        candidates.append(root / "boot" / f"config-{version}")
    for cand in candidates:
        try:
            text = cand.read_text(errors="replace")
        except OSError:
            continue
        return "\nCONFIG_MODULE_SIG_FORCE=y" not in "\n" + text
    return False


def _unzstd(path: Path, data: bytes) -> bytes:
    """A .ko.zst's content: with the zstandard module if installed, else the zstd tool."""
    try:
        import zstandard
    except ImportError:
        zstandard = None
    if zstandard is not None:
        out: bytes = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        return out
    zstd = shutil.which("zstd")
    if zstd is None:
        raise ApplianceError(f"{path}: .zst modules need the zstd tool or the zstandard package")
    res = subprocess.run([zstd, "-dc"], input=data, capture_output=True, check=False)
    if res.returncode != 0:
        raise ApplianceError(f"{path}: zstd -d failed: "
                             f"{res.stderr.decode(errors='replace').strip()}")
    return res.stdout


# --------------------------------------------------------------------------------------------
# Host binaries


def _first_existing(candidates: Iterable[str], what: str) -> Path:
    for c in candidates:
        if os.path.exists(c):
            return Path(c)
    found = shutil.which(what)
    if found:
        return Path(found)
    raise ApplianceError(f"{what} not found on the host (looked in {', '.join(candidates)})")


def shared_libraries(binary: Path) -> list[str]:
    """Absolute paths of the libraries ``ldd`` names for *binary*, the loader included."""
    try:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ApplianceError("ldd not found on the host") from exc
    if "not a dynamic executable" in out.stdout + out.stderr:
        return []
    libs: list[str] = []
    for line in out.stdout.splitlines():
        line = line.strip()
        m = re.match(r"\S+ => (/\S+) \(", line) or re.match(r"(/\S+) \(", line)
        if m:
            libs.append(m.group(1))
        elif "not found" in line:
            raise ApplianceError(f"{binary}: ldd says {line}")
    return libs


# --------------------------------------------------------------------------------------------
# Guest scripts

INIT_SCRIPT = r"""#!/bin/sh
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=1777 tmpfs /tmp
echo "dmimage-guest: init at $(cut -d' ' -f1 /proc/uptime)s" > /dev/kmsg
for m in $(cat /etc/modules.order); do
  insmod "/lib/modules/$m" || echo "dmimage-guest: insmod $m failed" > /dev/kmsg
done
# The agent talks over the virtio-serial port named dmimage.agent (its node appears once the
# device has announced the port): a byte there costs the emulator next to nothing, on the
# 16550 UART it cost ~27 us of TCG CPU (serial 0 stays the console). A port opens only once:
# the agent's stdin and stdout share one open (<> and >&0).
port=; i=0
while [ -z "$port" ] && [ $i -lt 400 ]; do
  for p in /sys/class/virtio-ports/vport*; do
    n=; read -r n < "$p/name" 2>/dev/null
    [ "$n" = dmimage.agent ] && [ -c "/dev/${p##*/}" ] && port="/dev/${p##*/}"
  done
  [ -n "$port" ] || { sleep 0.05; i=$((i+1)); }
done
[ -n "$port" ] || echo "dmimage-guest: no virtio port dmimage.agent" > /dev/kmsg
# The agent runs as init's child, not as init: what a command leaves running is re-parented
# to PID 1 when its shell exits, and its end must not signal the agent mid-read (busybox sh
# restarts an interrupted read and loses the bytes it had). init reaps those orphans in wait.
/bin/sh /agent <>"$port" >&0 2>/dev/console &
wait
echo "dmimage-guest: agent exited" > /dev/kmsg
exec sleep 2147483647
"""

# Line protocol (host <-> guest), one frame per line; agent.py's docstring has the frames
# (the script's lines verbatim, outputs raw with separators) and why the loop forks so little.
AGENT_SCRIPT = r"""#!/bin/sh
export PATH=/sbin:/bin HOME=/tmp DM_DISABLE_UDEV=1
cd /tmp
# Under TCG every process a command costs is ~10 ms of CPU, so the loop forks as little as it
# can: the script arrives as raw lines (the count frames it), the watchdog is a subshell that
# sleeps in the read builtin on a fifo nobody writes (busybox's sleep would be an exec), and
# the outputs go out raw (the port is binary-clean) by one cat, each followed by a separator
# line the host chose (its token and the id: no output can forge it), so there is no stat,
# no base64 and, for empty outputs, no process at all. rm and kill are builtins/NOFORK. A
# script over 1 KiB is read by one dd instead (the read builtin takes a byte per system call).
mkfifo /tmp/.wd
echo "@@READY $(cut -d' ' -f1 /proc/uptime)"
while read -r tag id tmo n nb tok; do
  [ "$tag" = "@@C" ] || continue
  if [ "${nb:-0}" -gt 1024 ]; then
    dd of=/tmp/.c.sh bs="$nb" count=1 iflag=fullblock 2>/dev/null
  else
    i=0
    while [ "$i" -lt "$n" ] && IFS= read -r l; do printf '%s\n' "$l"; i=$((i+1)); done >/tmp/.c.sh
  fi
  rm -f /tmp/.to.*
  setsid sh /tmp/.c.sh </dev/null >/tmp/.o 2>/tmp/.e &
  pid=$!
  wd=
  if [ "$tmo" -gt 0 ]; then
    # The watchdog acts only while this very command still runs (its run file exists): one
    # that was scheduled late must not mark or kill a later command.
    : > "/tmp/.run.$id"
    # Before the kill, /diag records what the guest is doing (for the host's error). It may
    # block itself (an ioctl on a stuck pool): it gets 8 s (the host waits 20 s past the
    # timeout), and the reply carries whatever it wrote by then.
    ( read -t "$tmo" l <>/tmp/.wd
      [ -e "/tmp/.run.$id" ] || exit 0
      : > "/tmp/.to.$id"
      rm -f /tmp/.d /tmp/.d.end.*
      ( sh /diag "$pid"; : > "/tmp/.d.end.$id" ) >/tmp/.d 2>&1 &
      i=0
      while [ "$i" -lt 8 ] && [ ! -e "/tmp/.d.end.$id" ]; do
        read -t 1 l <>/tmp/.wd; i=$((i+1))
      done
      [ -e "/tmp/.run.$id" ] && kill -KILL -"$pid"
    ) </dev/null >/dev/null 2>&1 &
    wd=$!
  fi
  wait "$pid" 2>/dev/null  # (ash would print "Killed" on the console)
  rc=$?
  # Reap the watchdog now: ash restarts a read that SIGCHLD interrupts from scratch, so a child
  # dying while the next frame is half read would lose that frame.
  [ -n "$wd" ] && { rm -f "/tmp/.run.$id"; kill -KILL "$wd" 2>/dev/null; wait "$wd" 2>/dev/null; }
  to=0; [ -e "/tmp/.to.$id" ] && to=1
  printf '@@R %s %s %s\n' "$id" "$rc" "$to"
  if [ "$to" = 1 ]; then
    # stderr, then a line of the token's ending in .diag, then what /diag wrote so far
    printf '@@%s.%s\n' "$tok" "$id" >/tmp/.s
    printf '@@%s.%s.diag\n' "$tok" "$id" >/tmp/.g
    cat /tmp/.o /tmp/.s /tmp/.e /tmp/.g /tmp/.d /tmp/.s 2>/dev/null
  elif [ -s /tmp/.o ] || [ -s /tmp/.e ]; then
    printf '@@%s.%s\n' "$tok" "$id" >/tmp/.s
    cat /tmp/.o /tmp/.s /tmp/.e /tmp/.s
  else
    printf '@@%s.%s\n@@%s.%s\n' "$tok" "$id" "$tok" "$id"
  fi
done
echo "dmimage-guest: agent input closed" > /dev/kmsg
"""


#: Run by the agent's watchdog when a command overran its timeout, before the kill ($1: the
#: command's process group): what the guest is doing, for the host's ``GuestCommandError``.
#: A task waiting in a loop with a timeout (blk_io_schedule, mempool_alloc) or interruptibly
#: never trips the hung-task detector, so nothing else would say where it waits. The sysrq
#: 'w' dump goes to the console too: __handle_sysrq restores the console level before the
#: handler prints (at KERN_INFO), so the level is raised around it; the markers around it
#: let the host's kernel-log check tell it from a real call trace. The requests in flight
#: tell a completion a disk never gave (a dd waiting with nothing in flight waits on dm) from
#: a dm stall. The surest steps come first: a dmsetup ioctl can block on a stuck pool
#: (status --noflush: no commit).
DIAG_SCRIPT = r"""#!/bin/sh
g=$1
read -r lv rest </proc/sys/kernel/printk
echo "dmimage-guest: blocked tasks (sysrq w) at a command's timeout" >/dev/kmsg
echo 7 >/proc/sys/kernel/printk; echo w >/proc/sysrq-trigger; echo "$lv" >/proc/sys/kernel/printk
echo "dmimage-guest: end of blocked tasks" >/dev/kmsg
read -r up rest </proc/uptime
echo "guest uptime ${up}s; tasks (user ones, kernel threads not sleeping): pid state pgrp wchan"\
" name(: args), and the stack of those in D or R state or in the command's group $g"
for d in /proc/[0-9]*; do
  p=${d#/proc/}; [ "$p" = $$ ] && continue
  s=; read -r s <"$d/stat" 2>/dev/null || continue
  n=${s#*(}; n=${n%)*}; set -- ${s##*) }
  st=$1 pg=$3 k=$(($7 & 0x200000))
  [ "$k" != 0 ] && { [ "$st" = S ] || [ "$st" = I ]; } && continue
  w=; read -r w <"$d/wchan" 2>/dev/null
  [ "$k" = 0 ] && { a=$(tr '\0' ' ' <"$d/cmdline" 2>/dev/null); n="$n: ${a:0:160}"; }
  echo "$p $st $pg ${w:-0} $n"
  case $st in D|R) ;; *) [ "$pg" = "$g" ] || continue ;; esac
  sed 's/^\[<0>\]/   /' "$d/stack" 2>/dev/null
done
l=
for f in /sys/block/*/inflight; do
  [ -e "$f" ] || continue
  r=0 w=0; read -r r w <"$f"
  [ "$r$w" = 00 ] || { f=${f%/inflight}; l="$l ${f##*/} $r $w;"; }
done
echo "requests in flight (device reads writes):${l:- none}"
awk '/^(MemTotal|MemFree|MemAvailable|Cached|Shmem|Slab|SUnreclaim|KernelStack|Dirty|Writeback):/'\
' {printf "%s %s ", $1, $2} END {print "(kB)"}' /proc/meminfo
echo "dmsetup info -c:"; dmsetup info -c 2>&1
echo "dmsetup status --noflush:"; dmsetup status --noflush 2>&1
"""

# --------------------------------------------------------------------------------------------
# Building


@dataclass
class Appliance:
    """A built initramfs and what went into it."""

    path: Path
    modules: list[str] = field(default_factory=list)
    digest: str = ""


def _inputs(moddir: Path, extra_modules: Iterable[str] = ()
            ) -> tuple[Path, Path, list[str], list[str]]:
    busybox = _first_existing(BUSYBOX_CANDIDATES, "busybox")
    dmsetup = _first_existing(DMSETUP_CANDIDATES, "dmsetup")
    libs = shared_libraries(dmsetup)
    if shared_libraries(busybox):
        raise ApplianceError(f"{busybox} is dynamically linked: install busybox-static")
    mods = resolve_modules(moddir)
    if extra_modules:
        mods += [m for m in resolve_modules(moddir, extra_modules, ()) if m not in mods]
    return busybox, dmsetup, libs, mods


def build_initramfs(moddir: Path | str, *, cache_dir: Path | None = None,
                    compress: bool = False, extra_modules: Iterable[str] = ()) -> Appliance:
    """Build (or reuse from the cache) the guest initramfs for the kernel whose modules live in
    *moddir* (``.../lib/modules/<version>``). ``extra_modules`` are loaded too, after the
    standard set (e.g. HOST_SHARE_MODULES).

    Uncompressed by default: under TCG the kernel unpacks a plain cpio faster than it gunzips.
    """
    moddir = Path(moddir)
    busybox, dmsetup, libs, mods = _inputs(moddir, extra_modules)

    h = hashlib.sha256()
    h.update(b"dmimage-appliance-v2\0")  # v2: modules without signatures
    h.update(INIT_SCRIPT.encode() + AGENT_SCRIPT.encode() + DIAG_SCRIPT.encode())
    h.update(b"gz" if compress else b"raw")
    strip = signatures_optional(moddir)
    if not strip:
        h.update(b"signed modules\0")
    for p in [busybox, dmsetup, *map(Path, libs), *(moddir / m for m in mods)]:
        data = Path(p).read_bytes()  # follows symlinks: the content that will be copied
        h.update(f"{p}\0{len(data)}\0".encode())
        h.update(data)
    digest = h.hexdigest()[:20]

    cache = (cache_dir or cache_root()) / "appliance"
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"initramfs-{digest}.cpio{'.gz' if compress else ''}"
    if out.exists():
        return Appliance(out, [os.path.basename(m) for m in mods], digest)

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) if compress \
            else raw
        w = CpioWriter(stream)
        for d in ("bin", "sbin", "dev", "etc", "lib", "lib/modules", "lib64", "proc", "sys",
                  "tmp", "mnt", "usr"):
            w.add_dir(d, 0o1777 if d == "tmp" else 0o755)
        w.add_chardev("dev/console", 5, 1)
        w.add_chardev("dev/null", 1, 3, 0o666)
        w.add_file("bin/busybox", busybox.read_bytes(), 0o755)
        applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                                 check=True).stdout.split()
        links = set()
        for applet in applets:
            top = applet.split("/")[0]
            if top not in ("bin", "sbin"):
                applet = "bin/" + os.path.basename(applet)
            links.add(applet)
        links.discard("bin/busybox")
        for applet in sorted(links):
            w.add_symlink(applet, "/bin/busybox")
        w.add_file("sbin/dmsetup", dmsetup.read_bytes(), 0o755)
        made_dirs = {"lib", "lib64", "usr"}
        for lib in libs:
            rel = lib.lstrip("/")
            parts = rel.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in made_dirs:
                    w.add_dir(d)
                    made_dirs.add(d)
            w.add_file(rel, Path(lib).read_bytes(), 0o755)
        names = []
        for m in mods:
            name = re.sub(r"\.(xz|gz|zst)$", "", os.path.basename(m))
            data = read_module(moddir / m)
            w.add_file(f"lib/modules/{name}", strip_signature(data) if strip else data)
            names.append(name)
        w.add_file("etc/modules.order", ("\n".join(names) + "\n").encode())
        w.add_file("etc/passwd", b"root:x:0:0:root:/tmp:/bin/sh\n")
        w.add_file("init", INIT_SCRIPT.encode(), 0o755)
        w.add_file("agent", AGENT_SCRIPT.encode(), 0o755)
        w.add_file("diag", DIAG_SCRIPT.encode(), 0o755)
        w.close()
        if stream is not raw:
            stream.close()
    os.replace(tmp, out)
    return Appliance(out, names, digest)
