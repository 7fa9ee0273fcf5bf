"""Where commands write their results: text to stdout in one write, and output files written
atomically (a temp file beside the target, renamed when complete, so an interrupted or failed
command never leaves a half-written file under the final name)."""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from dmimage.errors import DeviceError


def write_text(text: str) -> None:
    """The whole of a command's text result to stdout, encoded, in one write."""
    out = sys.stdout.buffer
    out.write(text.encode())
    out.flush()


@contextmanager
def atomic_output(path: str) -> Iterator[BinaryIO]:
    """A file to write the result to, renamed onto *path* once complete. When *path* is
    a device or a pipe (``-o /dev/null``, a FIFO) it is written directly: a rename would
    replace the device node with a regular file. A symlink is followed (its target is
    replaced, not the link: ``/dev/stdout`` stays a link)."""
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        try:
            f = open(path, "wb")  # noqa: SIM115 - closed below, errors mapped
        except OSError as exc:
            raise DeviceError(f"{path}: {exc.strerror}") from None
        try:
            with f:
                yield f
        except OSError as exc:
            raise DeviceError(f"{path}: {exc.strerror}") from None
        return
    target = os.path.realpath(path) if st is not None else os.path.abspath(path)
    directory = os.path.dirname(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp",
                                   dir=directory)
    except OSError as exc:
        raise DeviceError(f"{path}: cannot create a file in {directory}: "
                          f"{exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except OSError as exc:
        _unlink(tmp)
        raise DeviceError(f"{path}: {exc.strerror}") from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
