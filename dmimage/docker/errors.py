"""Errors of the Docker store reader: each names the file it is about, and prints as one line."""

from __future__ import annotations

from dmimage.errors import DeviceError, InputError


class StoreError(InputError):
    """A file of the store is malformed or inconsistent (exit 1)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.detail = message


class UnsafePathError(StoreError):
    """A name read from the store would lead outside ROOT (``../``, ``/``, a symlink out of
    ROOT) or through a symlink loop: refused, never followed."""


class StoreIOError(DeviceError):
    """ROOT or one of its files cannot be read (missing, permission): exit 2."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class NameNotFound(StoreError):
    """A NAME given on the command line names no image, container, layer or device."""


class AmbiguousName(StoreError):
    """A NAME matches more than one object (an id prefix that is not unique)."""
