"""Where commands write their results: text to stdout in one write, and output files written
atomically (a temp file beside the target, renamed when complete, so an interrupted or failed
command never leaves a half-written file under the final name)."""

from __future__ import annotations

import os
import sys
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
    import tempfile  # lazily: its import (random, hashlib) costs every command start-up

    target = os.path.abspath(path)
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
