"""Paths under ROOT that stay under ROOT.

Docker's files name other files (a layer's cache-id names a device file, a container id names
a directory). Every such name is checked to be one plain path component, and every resolved
path (symlinks followed, strictly) must still lie inside ROOT, so a cache-id of ``../../etc``
or a symlink pointing out of ROOT is an :class:`UnsafePathError`, and a symlink loop is too.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import Any

from dmimage.docker.errors import StoreError, StoreIOError, UnsafePathError


def check_component(name: str, where: str) -> str:
    """*name* if it is one plain path component; else :class:`UnsafePathError`."""
    if (not name or name in (".", "..") or "/" in name or "\0" in name
            or name != name.strip("\n")):
        raise UnsafePathError(where, f"unsafe name {name!r} (not one plain path component)")
    return name


class Root:
    """A data root: every path made from it is checked to resolve inside it."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.given = os.fspath(root)
        try:
            self.real = os.path.realpath(self.given, strict=True)
        except OSError as exc:
            raise StoreIOError(self.given, exc.strerror or str(exc)) from None
        if not os.path.isdir(self.real):
            raise StoreIOError(self.given, "not a directory")
        self._dirs: dict[str, str] = {"": self.real}
        #: per directory (by rel), its entries: name -> "d" (directory), "l" (symlink), "f"
        #: (regular file) or "o" (FIFO, device, socket), from one scandir (d_type, no stat
        #: per entry)
        self._entries: dict[str, dict[str, str]] = {}

    def _listing(self, rel: str, real: str) -> dict[str, str] | None:
        hit = self._entries.get(rel)
        if hit is not None:
            return hit
        try:
            with os.scandir(real) as it:
                out = {e.name: ("f" if e.is_file(follow_symlinks=False) else
                                "d" if e.is_dir(follow_symlinks=False) else
                                "l" if e.is_symlink() else "o") for e in it}
        except OSError:
            return None  # left to the per-path checks (and their error messages)
        self._entries[rel] = out
        return out

    def display(self, rel: str) -> str:
        return os.path.join(self.given, rel)

    def resolve(self, rel: str, *, must_exist: bool = True) -> str | None:
        """The real path of ROOT/*rel*, or None when it does not exist and *must_exist* is
        false. Escapes and loops raise :class:`UnsafePathError`.

        Directories are resolved once and cached; a last component that is not a symlink
        then costs one lstat, so reading a store of thousands of files stays fast."""
        parent, _, name = rel.rpartition("/")
        if not name or name in (".", ".."):
            return self._full(rel, must_exist)
        preal = self._dirs.get(parent)
        if preal is None:
            preal = self.resolve(parent, must_exist=must_exist)
            if preal is None:
                return None
            self._dirs[parent] = preal
        path = f"{preal}/{name}"
        listing = self._listing(parent, preal)
        if listing is not None:
            kind = listing.get(name)
            if kind is None:
                if must_exist:
                    raise StoreIOError(self.display(rel), "No such file or directory")
                return None
            if kind != "l":
                return path
            return self._full(rel, must_exist)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            if must_exist:
                raise StoreIOError(self.display(rel), "No such file or directory") from None
            return None
        except OSError as exc:
            raise StoreIOError(self.display(rel), exc.strerror or str(exc)) from None
        if stat.S_ISLNK(st.st_mode):
            return self._full(rel, must_exist)
        return path

    def _full(self, rel: str, must_exist: bool) -> str | None:
        """Resolve every component (symlinks included, strictly) and check the result."""
        shown = self.display(rel)
        try:
            real = os.path.realpath(os.path.join(self.real, rel), strict=True)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(shown, "symlink loop") from None
            if exc.errno in (errno.ENOENT, errno.ENOTDIR) and not must_exist:
                # A dangling symlink is only harmless if its target stays inside ROOT.
                lexical = os.path.realpath(os.path.join(self.real, rel))
                self._inside(lexical, shown)
                return None
            raise StoreIOError(shown, exc.strerror or str(exc)) from None
        self._inside(real, shown)
        return real

    def _inside(self, real: str, shown: str) -> None:
        if real != self.real and not real.startswith(self.real.rstrip("/") + "/"):
            raise UnsafePathError(shown, f"resolves outside the data root (to {real})")

    def exists(self, rel: str) -> bool:
        return self.resolve(rel, must_exist=False) is not None

    def listdir(self, rel: str) -> list[str]:
        """Sorted entries of ROOT/*rel* ([] when it does not exist)."""
        real = self.resolve(rel, must_exist=False)
        if real is None:
            return []
        try:
            return sorted(os.listdir(real))
        except OSError as exc:
            raise StoreIOError(self.display(rel), exc.strerror or str(exc)) from None

    def is_dir(self, rel: str) -> bool:
        real = self.resolve(rel, must_exist=False)
        if real is None:
            return False
        parent, _, name = rel.rpartition("/")
        kind = self._entries.get(parent, {}).get(name)
        if kind in ("d", "f", "o"):
            return kind == "d"
        return os.path.isdir(real)

    def read_bytes(self, rel: str) -> bytes:
        real = self.resolve(rel)
        assert real is not None
        parent, _, name = rel.rpartition("/")
        kind = self._entries.get(parent, {}).get(name)
        if kind == "o":  # opening a FIFO would wait for a writer
            raise StoreError(self.display(rel), "not a regular file")
        try:
            # O_NONBLOCK: a FIFO behind a symlink does not block the open either
            fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except IsADirectoryError:
            raise StoreError(self.display(rel), "is a directory, expected a file") from None
        except OSError as exc:
            raise StoreIOError(self.display(rel), exc.strerror or str(exc)) from None
        try:
            # Docker's files are small: one read, and a short read of a regular file is its
            # end (no second read to see EOF: a store has thousands of these files)
            b = os.read(fd, 1 << 16)
            if len(b) < 1 << 16 and kind == "f":
                return b
            parts = [b]
            while b:
                b = os.read(fd, 1 << 20)
                parts.append(b)
            return b"".join(parts)
        except IsADirectoryError:
            raise StoreError(self.display(rel), "is a directory, expected a file") from None
        except OSError as exc:
            raise StoreIOError(self.display(rel), exc.strerror or str(exc)) from None
        finally:
            os.close(fd)

    def read_text(self, rel: str) -> str:
        data = self.read_bytes(rel)
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise StoreError(self.display(rel), f"not UTF-8 text (byte {exc.start})") from None

    def read_json(self, rel: str) -> Any:
        text = self.read_text(rel)
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreError(self.display(rel),
                             f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
                             ) from None

    def read_json_object(self, rel: str) -> dict[str, Any]:
        obj = self.read_json(rel)
        if not isinstance(obj, dict):
            raise StoreError(self.display(rel), "expected a JSON object")
        return obj
