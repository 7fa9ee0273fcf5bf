"""Output files that appear whole or not at all: the bytes go to a temp file beside the target,
flushed to disk, then renamed over it. An interrupted or failed command never leaves a
half-written file under the final name, and a crash right after the rename cannot leave an
empty one.

Targets that are not regular files are not renamed over: a pipe or character device
(``-o /dev/stdout``, ``-o /dev/null``) is written straight through, since renaming a temp file
over ``/dev/null`` as root would replace the device node itself; a block device is refused,
since these outputs are files, not images to write onto a disk. A symlink to a regular file
keeps the link and replaces the file it names.

Also here: ``refuse_writing_input``, the repairs' guard that their output is not their input.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from dmimage.errors import DeviceError, UsageError


@contextmanager
def replaced_when_complete(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into; it becomes ``path`` only when the
    block exits normally. Errors are one-line ``DeviceError``/``UsageError``s naming ``path``."""
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise DeviceError(f"{name}: {exc.strerror}") from None
    if st is not None and stat.S_ISBLK(st.st_mode):
        raise UsageError(f"{name}: refusing to write onto a block device; give a file path")
    if st is not None and not stat.S_ISREG(st.st_mode):
        with _straight_through(name) as f:
            yield f
        return
    import tempfile  # lazily: its import (random, hashlib) would cost every command's start-up

    target = os.path.realpath(name)
    directory = os.path.dirname(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp",
                                   dir=directory)
    except OSError as exc:
        raise DeviceError(f"{name}: cannot create a file in {directory}: "
                          f"{exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (st.st_mode & 0o7777) if st is not None else 0o666 & ~umask)
        os.replace(tmp, target)
    except OSError as exc:
        _unlink(tmp)
        raise DeviceError(f"{name}: {exc.strerror}") from None
    except BaseException:
        _unlink(tmp)
        raise


@contextmanager
def _straight_through(name: str) -> Iterator[BinaryIO]:
    try:
        f = open(name, "wb")
    except OSError as exc:
        raise DeviceError(f"{name}: {exc.strerror}") from None
    try:
        with f:
            yield f
    except OSError as exc:
        raise DeviceError(f"{name}: {exc.strerror}") from None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def refuse_writing_input(input_path: str | os.PathLike[str],
                         output_path: str | os.PathLike[str]) -> None:
    """Repairs read one file and write another: the same file (by inode, so also through a
    link or a second name) as both is a usage error, before anything is read or written."""
    try:
        same = os.path.samefile(input_path, output_path)
    except OSError:
        same = False
    if same:
        raise UsageError("input and output are the same file: repair never writes its input")

