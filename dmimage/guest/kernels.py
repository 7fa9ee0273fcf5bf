"""Guest kernels: Debian 12's installed one, and Debian 13's fetched (unpacked, not installed).

Selection: ``DMIMAGE_VM_KERNELS`` (comma-separated names, e.g. ``deb12,deb13``; default
``deb12``) or the ``--kernel`` options of the CLI and the pytest plugin. A name may also be a
path to a vmlinuz file whose modules are in ``/lib/modules/<version>`` (or pass
``vmlinuz:moddir``).
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
KNOWN = ("deb12", "deb13")
FETCH_TOOL_ENV = "DMIMAGE_DEBIAN13_FETCH"


class KernelNotFound(DmimageError):
    """A requested guest kernel is not installed and cannot be fetched."""


@dataclass(frozen=True)
class Kernel:
    """A guest kernel image and its module tree."""

    name: str  # "deb12", "deb13", or a path given by the user
    version: str  # e.g. "6.1.0-56-amd64"
    vmlinuz: Path
    moddir: Path  # .../lib/modules/<version>, with modules.dep

    def __str__(self) -> str:
        return f"{self.name} ({self.version})"


def _version_key(v: str) -> list[int | str]:
    return [int(x) if x.isdigit() else x for x in re.split(r"[.+~-]", v)]


def _from_boot(boot: Path, modroots: list[Path], name: str) -> list[Kernel]:
    found = []
    for vmlinuz in glob.glob(str(boot / "vmlinuz-*")):
        version = os.path.basename(vmlinuz)[len("vmlinuz-"):]
        for root in modroots:
            moddir = root / version
            if (moddir / "modules.dep").exists():
                found.append(Kernel(name, version, Path(vmlinuz), moddir))
                break
    found.sort(key=lambda k: _version_key(k.version))
    return found


def debian12() -> Kernel:
    """The newest kernel installed on the host from linux-image-amd64 (/boot + /lib/modules)."""
    found = _from_boot(Path("/boot"), [Path("/lib/modules"), Path("/usr/lib/modules")], "deb12")
    if not found:
        raise KernelNotFound("no installed kernel found (/boot/vmlinuz-* with "
                             "/lib/modules/<version>/modules.dep): apt-get install "
                             "linux-image-amd64")
    return found[-1]


def debian13_dir() -> Path:
    return cache_root() / "debian13"


def _fetch_tool() -> Path:
    env = os.environ.get(FETCH_TOOL_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2]
    for cand in (here / "tools/debian13-fetch",  # the repository's own copy
                 here.parent / "shared/tools/debian13-fetch",
                 Path("/work/shared/tools/debian13-fetch")):
        if cand.exists():
            return cand
    raise KernelNotFound(f"debian13-fetch tool not found (set {FETCH_TOOL_ENV})")


def _find_debian13(dest: Path) -> Kernel | None:
    kernels: list[Kernel] = []
    for pkg in sorted(glob.glob(str(dest / "linux-image-*"))):
        p = Path(pkg)
        kernels += _from_boot(p / "boot", [p / "usr/lib/modules", p / "lib/modules"], "deb13")
    if not kernels:
        return None
    kernels.sort(key=lambda k: _version_key(k.version))
    return kernels[-1]


def ensure_debian13(*, fetch: bool = True) -> Kernel:
    """Debian 13's kernel, unpacked under ``<cache>/debian13``; fetched on first use."""
    dest = debian13_dir()
    k = _find_debian13(dest)
    if k is not None or not fetch:
        if k is None:
            raise KernelNotFound(f"no Debian 13 kernel under {dest}")
        return k
    tool = _fetch_tool()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        pkg = subprocess.run(["sh", str(tool), str(dest), "--print-kernel"], capture_output=True,
                             text=True, check=True, timeout=600).stdout.strip()
        if not pkg:
            raise KernelNotFound("debian13-fetch --print-kernel printed nothing")
        subprocess.run(["sh", str(tool), str(dest), pkg], capture_output=True, text=True,
                       check=True, timeout=1800)
    except subprocess.CalledProcessError as exc:
        raise KernelNotFound(f"fetching the Debian 13 kernel failed: {exc.stderr.strip()}") from exc
    except subprocess.TimeoutExpired as exc:
        raise KernelNotFound("fetching the Debian 13 kernel timed out") from exc
    k = _find_debian13(dest)
    if k is None:
        raise KernelNotFound(f"debian13-fetch ran but no kernel appeared under {dest}")
    return k


def kernel_by_name(name: str, *, fetch: bool = True) -> Kernel:
    """Resolve ``deb12``, ``deb13``, ``VMLINUZ`` or ``VMLINUZ:MODDIR`` to a Kernel."""
    if name == "deb12":
        return debian12()
    if name == "deb13":
        return ensure_debian13(fetch=fetch)
    vmlinuz, _, moddir = name.partition(":")
    path = Path(vmlinuz)
    if not path.exists():
        raise KernelNotFound(f"unknown kernel {name!r} (use one of {', '.join(KNOWN)} "
                             "or a vmlinuz path)")
    version = path.name.removeprefix("vmlinuz-")
    mdir = Path(moddir) if moddir else Path("/lib/modules") / version
    if not (mdir / "modules.dep").exists():
        raise KernelNotFound(f"{mdir}/modules.dep missing for kernel {name}")
    return Kernel(name, version, path, mdir)


def default_names() -> list[str]:
    """``deb12``, plus ``deb13`` when it is already unpacked in the cache (no fetching)."""
    names = ["deb12"]
    if _find_debian13(debian13_dir()) is not None:
        names.append("deb13")
    return names


def selected_names(value: str | None = None) -> list[str]:
    """Kernel names from *value* or ``$DMIMAGE_VM_KERNELS`` (default: ``default_names()``)."""
    raw = value if value is not None else os.environ.get(ENV_KERNELS, "")
    names = [n.strip() for n in raw.split(",") if n.strip()]
    return names or default_names()


def select_kernels(value: str | None = None, *, fetch: bool = True) -> list[Kernel]:
    return [kernel_by_name(n, fetch=fetch) for n in selected_names(value)]


def qemu_binary() -> str | None:
    return os.environ.get("DMIMAGE_QEMU") or shutil.which("qemu-system-x86_64")


# --------------------------------------------------------------------------------------------
# Fast boot: an uncompressed vmlinux with a PVH entry point

_MAGICS = ((b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x1f\x8b\x08", "gzip"))


def _config_has_pvh(kernel: Kernel) -> bool:
    cfg = kernel.vmlinuz.parent / f"config-{kernel.version}"
    try:
        return "\nCONFIG_PVH=y\n" in "\n" + cfg.read_text() + "\n"
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
