"""Guest kernels: Debian 12's installed one, and Debian 11's, 13's and 13-backports' fetched
(unpacked from their .debs into the cache, never installed).

Selection: ``DMIMAGE_VM_KERNELS`` (comma-separated names, e.g. ``deb12,deb13``, or ``all`` for
the four of ``KNOWN``; default ``deb12``, plus ``deb13`` when unpacked) or the ``--kernel``
options of the CLI and the pytest plugin. A name may also be a path to a vmlinuz file whose
modules are in ``/lib/modules/<version>`` (or pass ``vmlinuz:moddir``; a ``.../modules/<version>/
vmlinuz`` path brings its own module tree).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dmimage.errors import DmimageError

from .appliance import cache_root

ENV_KERNELS = "DMIMAGE_VM_KERNELS"
FETCH_TOOL_ENV = "DMIMAGE_DEBIAN_FETCH"


@dataclass(frozen=True)
class Release:
    """A Debian suite whose current kernel is fetched as .debs into ``<cache>/<cache_dir>``."""

    name: str  # the kernel name users type, e.g. "deb11"
    suite: str  # the Debian suite, e.g. "bullseye"
    cache_dir: str  # under cache_root(), e.g. "debian11"
    title: str  # for messages, e.g. "Debian 11"


#: Kernels fetched from Debian (the host's Debian 12 kernel, ``deb12``, is installed instead).
RELEASES = {r.name: r for r in (
    Release("deb11", "bullseye", "debian11", "Debian 11 (5.10)"),
    Release("deb13", "trixie", "debian13", "Debian 13 (6.12)"),
    Release("deb13-backports", "trixie-backports", "debian13-backports",
            "Debian 13 backports (newest kernel)"),
)}
#: Every named kernel, oldest first; ``all`` selects these.
KNOWN = ("deb11", "deb12", "deb13", "deb13-backports")


class KernelNotFound(DmimageError):
    """A requested guest kernel is not installed and cannot be fetched."""


@dataclass(frozen=True)
class Kernel:
    """A guest kernel image and its module tree."""

    name: str  # "deb11", "deb12", "deb13", "deb13-backports", or a path given by the user
    version: str  # e.g. "6.1.0-56-amd64"
    vmlinuz: Path
    moddir: Path  # .../lib/modules/<version>, with modules.dep

    def __str__(self) -> str:
        return f"{self.name} ({self.version})"


def _version_key(v: str) -> list[int | str]:
    return [int(x) if x.isdigit() else x for x in re.split(r"[.+~-]", v)]


def config_file(kernel: Kernel) -> Path | None:
    """The kernel's build config: ``/boot/config-<version>`` beside the vmlinuz (up to 6.x),
    or ``config`` in the module directory (7.x packages install everything there)."""
    for cand in (kernel.vmlinuz.parent / f"config-{kernel.version}", kernel.moddir / "config"):
        if cand.exists():
            return cand
    return None


def _find_kernels(root: Path, modroots: list[Path], name: str) -> list[Kernel]:
    """Kernels under *root*, oldest first: ``boot/vmlinuz-<version>`` with a module tree in one
    of *modroots*, or ``<modroot>/<version>/vmlinuz`` (the layout of Debian's 7.x packages)."""
    found = []
    for vmlinuz in glob.glob(str(root / "boot" / "vmlinuz-*")):
        version = os.path.basename(vmlinuz)[len("vmlinuz-"):]
        for modroot in modroots:
            moddir = modroot / version
            if (moddir / "modules.dep").exists():
                found.append(Kernel(name, version, Path(vmlinuz), moddir))
                break
    versions = {k.version for k in found}
    for modroot in modroots:
        for vmlinuz in glob.glob(str(modroot / "*" / "vmlinuz")):
            moddir = Path(vmlinuz).parent
            if moddir.name not in versions and (moddir / "modules.dep").exists():
                found.append(Kernel(name, moddir.name, Path(vmlinuz), moddir))
                versions.add(moddir.name)
    found.sort(key=lambda k: _version_key(k.version))
    return found


def debian12() -> Kernel:
    """The newest kernel installed on the host from linux-image-amd64 (/boot + /lib/modules)."""
    found = _find_kernels(Path("/"), [Path("/lib/modules"), Path("/usr/lib/modules")], "deb12")
    if not found:
        raise KernelNotFound("no installed kernel found (/boot/vmlinuz-* with "
                             "/lib/modules/<version>/modules.dep): apt-get install "
                             "linux-image-amd64")
    return found[-1]


def release_dir(name: str) -> Path:
    """Where the fetched kernel *name* (a key of ``RELEASES``) is unpacked."""
    return cache_root() / RELEASES[name].cache_dir


def debian13_dir() -> Path:
    """Debian 13's cache (its kernel and thin-provisioning-tools 1.1)."""
    return release_dir("deb13")


def _fetch_tool() -> Path:
    env = os.environ.get(FETCH_TOOL_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2]
    for cand in (here / "tools/debian-fetch",  # the repository's own copy
                 here.parent / "shared/tools/debian-fetch"):
        if cand.exists():
            return cand
    raise KernelNotFound(f"the debian-fetch tool is not found (set {FETCH_TOOL_ENV})")


def find_fetched(name: str) -> Kernel | None:
    """The newest kernel already unpacked for *name* (a key of ``RELEASES``), or None."""
    dest = release_dir(name)
    kernels: list[Kernel] = []
    for pkg in sorted(glob.glob(str(dest / "linux-image-*"))):
        p = Path(pkg)
        kernels += _find_kernels(p, [p / "usr/lib/modules", p / "lib/modules"], name)
    if not kernels:
        return None
    kernels.sort(key=lambda k: _version_key(k.version))
    return kernels[-1]


def ensure_fetched(name: str, *, fetch: bool = True) -> Kernel:
    """The kernel of release *name*, unpacked under ``<cache>/<cache_dir>``; fetched on first
    use (the suite's current ``linux-image-amd64`` dependency) unless ``fetch`` is false."""
    rel = RELEASES[name]
    dest = release_dir(name)
    k = find_fetched(name)
    if k is not None:
        return k
    if not fetch:
        raise KernelNotFound(f"no {rel.title} kernel under {dest} (dmimage vm kernels --fetch "
                             f"{name})")
    tool = _fetch_tool()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        pkg = subprocess.run(["sh", str(tool), rel.suite, str(dest), "--print-kernel"],
                             capture_output=True, text=True, check=True, timeout=600).stdout.strip()
        if not pkg:
            raise KernelNotFound(f"{rel.suite} has no linux-image-amd64 dependency "
                                 "(debian-fetch --print-kernel printed nothing)")
        subprocess.run(["sh", str(tool), rel.suite, str(dest), pkg], capture_output=True,
                       text=True, check=True, timeout=1800)
    except subprocess.CalledProcessError as exc:
        raise KernelNotFound(f"fetching the {rel.title} kernel failed: "
                             f"{exc.stderr.strip()}") from exc
    except subprocess.TimeoutExpired as exc:
        raise KernelNotFound(f"fetching the {rel.title} kernel timed out") from exc
    k = find_fetched(name)
    if k is None:
        raise KernelNotFound(f"debian-fetch ran but no kernel appeared under {dest}")
    return k


def ensure_debian13(*, fetch: bool = True) -> Kernel:
    """Debian 13's kernel, unpacked under ``<cache>/debian13``; fetched on first use."""
    return ensure_fetched("deb13", fetch=fetch)


def kernel_by_name(name: str, *, fetch: bool = True) -> Kernel:
    """Resolve a name of ``KNOWN``, ``VMLINUZ`` or ``VMLINUZ:MODDIR`` to a Kernel."""
    if name == "deb12":
        return debian12()
    if name in RELEASES:
        return ensure_fetched(name, fetch=fetch)
    vmlinuz, _, moddir = name.partition(":")
    path = Path(vmlinuz)
    if not path.exists():
        raise KernelNotFound(f"unknown kernel {name!r} (use one of {', '.join(KNOWN)}, all, "
                             "or a vmlinuz path)")
    if path.name == "vmlinuz":  # .../modules/<version>/vmlinuz: the module tree is its directory
        version = path.parent.name
        mdir = Path(moddir) if moddir else path.parent
    else:
        version = path.name.removeprefix("vmlinuz-")
        mdir = Path(moddir) if moddir else Path("/lib/modules") / version
    if not (mdir / "modules.dep").exists():
        raise KernelNotFound(f"{mdir}/modules.dep missing for kernel {name}")
    return Kernel(name, version, path, mdir)


def default_names() -> list[str]:
    """``deb12``, plus ``deb13`` when it is already unpacked in the cache (no fetching)."""
    names = ["deb12"]
    if find_fetched("deb13") is not None:
        names.append("deb13")
    return names


def selected_names(value: str | None = None) -> list[str]:
    """Kernel names from *value* or ``$DMIMAGE_VM_KERNELS`` (default: ``default_names()``);
    ``all`` stands for every name in ``KNOWN``. Each name once, in the order given."""
    raw = value if value is not None else os.environ.get(ENV_KERNELS, "")
    names: list[str] = []
    for n in (n.strip() for n in raw.split(",")):
        for m in (KNOWN if n == "all" else (n,) if n else ()):
            if m not in names:
                names.append(m)
    return names or default_names()


def select_kernels(value: str | None = None, *, fetch: bool = True) -> list[Kernel]:
    return [kernel_by_name(n, fetch=fetch) for n in selected_names(value)]


@dataclass(frozen=True)
class KernelEntry:
    """One row of ``dmimage vm kernels``: a named kernel and whether it is here."""

    name: str
    state: str  # "installed" (deb12, the host's), "fetched", "not fetched", or "failed"
    kernel: Kernel | None
    where: Path  # the vmlinuz, or where a fetched kernel would be unpacked
    error: str = ""


def list_kernels(names: tuple[str, ...] | list[str] = KNOWN, *,
                 fetch: bool = False) -> list[KernelEntry]:
    """The state of each named kernel; with ``fetch``, missing ones are fetched first."""
    rows = []
    for name in names:
        if name == "deb12":
            try:
                k = debian12()
                rows.append(KernelEntry(name, "installed", k, k.vmlinuz))
            except KernelNotFound as exc:
                rows.append(KernelEntry(name, "failed", None, Path("/boot"), str(exc)))
            continue
        if name not in RELEASES:
            raise KernelNotFound(f"unknown kernel {name!r} (use one of {', '.join(KNOWN)})")
        found = find_fetched(name)
        if found is None and fetch:
            try:
                found = ensure_fetched(name)
            except KernelNotFound as exc:
                rows.append(KernelEntry(name, "failed", None, release_dir(name), str(exc)))
                continue
        rows.append(KernelEntry(name, "fetched", found, found.vmlinuz) if found is not None
                    else KernelEntry(name, "not fetched", None, release_dir(name)))
    return rows


def qemu_binary() -> str | None:
    return os.environ.get("DMIMAGE_QEMU") or shutil.which("qemu-system-x86_64")


# --------------------------------------------------------------------------------------------
# Fast boot: an uncompressed vmlinux with a PVH entry point

_MAGICS = ((b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x1f\x8b\x08", "gzip"))


def _config_has_pvh(kernel: Kernel) -> bool:
    cfg = config_file(kernel)
    try:
        return cfg is not None and "\nCONFIG_PVH=y\n" in "\n" + cfg.read_text() + "\n"
    except OSError:
        return False


def _bzimage_payload(data: bytes) -> tuple[bytes, str] | None:
    """The compressed kernel inside a bzImage, sliced with the setup header's payload fields."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return None
    setup_sects = data[0x1F1] or 4
    payload_offset = int.from_bytes(data[0x248:0x24C], "little")
    payload_length = int.from_bytes(data[0x24C:0x250], "little")
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start:start + payload_length]
    for magic, kind in _MAGICS:
        if payload.startswith(magic):
            return payload, kind
    return None


def _decompress(payload: bytes, kind: str) -> bytes | None:
    import gzip
    import lzma

    if kind == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if kind == "gzip":
        return gzip.decompress(payload)
    try:
        import zstandard

        out: bytes = zstandard.ZstdDecompressor().decompressobj().decompress(payload)
        return out
    except ImportError:
        pass
    zstd = shutil.which("zstd")
    if zstd is None:
        return None
    # The kernel build appends the uncompressed size (4 bytes) to the compressed stream.
    res = subprocess.run([zstd, "-dc"], input=payload[:-4], capture_output=True, check=False)
    return res.stdout if res.returncode == 0 else None


def boot_image(kernel: Kernel) -> Path:
    """The file to give QEMU's ``-kernel``: a cached uncompressed vmlinux (PVH entry, which
    skips firmware real-mode setup and in-guest decompression: ~2.5 s instead of ~5.5 s to
    the agent under TCG) when the kernel supports PVH and can be unpacked, else the vmlinuz.
    ``DMIMAGE_VM_PVH=0`` forces the vmlinuz."""
    if os.environ.get("DMIMAGE_VM_PVH", "1") == "0" or not _config_has_pvh(kernel):
        return kernel.vmlinuz
    st = kernel.vmlinuz.stat()
    out = cache_root() / "kernels" / f"vmlinux-{kernel.version}-{st.st_size}-{st.st_mtime_ns}"
    if out.exists():
        return out
    found = _bzimage_payload(kernel.vmlinuz.read_bytes())
    if found is None:
        return kernel.vmlinuz
    try:
        elf = _decompress(*found)
    except Exception:  # noqa: BLE001 - any failure: boot the bzImage instead
        elf = None
    if not elf or not elf.startswith(b"\x7fELF"):
        return kernel.vmlinuz
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_bytes(elf)
    os.replace(tmp, out)
    return out
