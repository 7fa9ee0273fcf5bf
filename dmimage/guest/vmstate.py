"""The saved-VM-state cache: one booted, idle guest per machine configuration, on disk.

A guest is booted once, saved with QMP ``migrate`` to a file and later guests start from that
file with ``-incoming`` (see ``Machine``). A state file is only valid for the exact machine it
came from, so its key hashes everything the guest's RAM and device state depend on:

- the content of the kernel image and of every initrd (``-kernel``, ``-initrd``);
- the QEMU binary (its ``--version`` text, size and mtime);
- the whole command line, with the per-run paths (run directory, host-share directory)
  replaced by placeholders: memory, CPUs, accelerator, kernel command line and the devices
  present (a machine with a host share has its own state, saved before the share is mounted).

Files live in ``$XDG_CACHE_HOME/dmimage/vmstate/<key>.state`` (or ``$DMIMAGE_VM_STATE_DIR``)
and are written to a temporary name and renamed into place, so concurrent creators never
expose a partial file; the last rename wins, and every candidate is a complete state of the
same configuration.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from functools import lru_cache
from pathlib import Path

from .appliance import cache_root

#: Bump when what a saved guest must be (agent protocol, restore steps) changes.
FORMAT = "dmimage-vmstate-v1"

#: Options whose next argument is a file whose *content* the guest's state depends on.
_CONTENT_OPTIONS = ("-kernel", "-initrd")

#: State files not used for this long are removed when a new one is saved.
STALE_SECONDS = 14 * 24 * 3600


def enabled() -> bool:
    """Saved states are used unless ``DMIMAGE_VM_SNAPSHOT=0``."""
    return os.environ.get("DMIMAGE_VM_SNAPSHOT", "1") not in ("0", "no", "false", "")


def state_dir() -> Path:
    """``$DMIMAGE_VM_STATE_DIR``, else ``$XDG_CACHE_HOME/dmimage/vmstate``."""
    env = os.environ.get("DMIMAGE_VM_STATE_DIR")
    return Path(env) if env else cache_root() / "vmstate"


@lru_cache(maxsize=32)
def _file_digest(path: str, dev: int, ino: int, size: int, mtime_ns: int) -> str:
    """blake2b of a file's content; memoized per process by identity, size and mtime."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    st = os.stat(path)
    return _file_digest(os.fspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4)
def _qemu_identity(path: str, size: int, mtime_ns: int) -> str:
    res = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                         check=False)
    return f"{res.stdout.strip()}\0{size}\0{mtime_ns}"


def qemu_identity(qemu: str) -> str:
    """The QEMU binary's ``--version`` text plus its size and mtime (a rebuilt binary of the
    same version gets a new key too)."""
    real = os.path.realpath(qemu)
    st = os.stat(real)
    return _qemu_identity(real, st.st_size, st.st_mtime_ns)


def state_key(argv: list[str], placeholders: dict[str, str]) -> str:
    """The cache key of the machine QEMU *argv* starts (without ``-incoming``).

    Every occurrence of a *placeholders* key (a per-run path) in the arguments is replaced by
    its value before hashing; ``-kernel``/``-initrd`` files count by content, not by name.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(FORMAT.encode() + b"\0")
    h.update(qemu_identity(argv[0]).encode() + b"\0")
    it = iter(argv[1:])
    for arg in it:
        if arg in _CONTENT_OPTIONS:
            path = next(it)
            h.update(f"{arg}\0{file_digest(path)}\0".encode())
            continue
        for old, new in placeholders.items():
            arg = arg.replace(old, new)
        h.update(arg.encode() + b"\0")
    return h.hexdigest()


def state_path(key: str) -> Path:
    return state_dir() / f"{key}.state"


def temp_path(key: str) -> Path:
    """A private name next to the final one (same file system, so the rename is atomic)."""
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    return d / f".{key}.{os.getpid()}.{time.monotonic_ns()}.tmp"


def publish(tmp: Path, key: str) -> Path:
    """Rename a completely written state into place and prune states unused for long."""
    final = state_path(key)
    os.replace(tmp, final)
    prune(keep=final)
    return final


def discard(path: Path, ino: int | None = None) -> None:
    """Remove a state file. With *ino* (of a state that failed to restore), only if it is still
    that very file: another process may have replaced it with a good one meanwhile."""
    try:
        if ino is not None and path.stat().st_ino != ino:
            return
        path.unlink()
    except FileNotFoundError:
        pass


def prune(keep: Path, max_age: float = STALE_SECONDS) -> None:
    """Remove states not used (atime/mtime) for *max_age* seconds, and temporary files of
    creators that died, so the cache does not grow with every kernel or appliance change."""
    now = time.time()
    for p in state_dir().iterdir():
        if p == keep:
            continue
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        age = now - max(st.st_atime, st.st_mtime)
        stale_tmp = p.name.endswith(".tmp") and now - st.st_mtime > 3600
        if age > max_age or stale_tmp:
            discard(p)
