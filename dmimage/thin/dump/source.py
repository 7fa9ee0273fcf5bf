"""A dump input opened once and readable again from its start, even when it is a pipe.

``dmimage restore -i <(thin_dump META)`` or ``-i /dev/stdin``: restore reads its input more
than once (the streamed layout first; on any doubt the whole-IR path's bulk parse, then expat),
and each pass starts by looking at the first bytes to tell XML from JSON. A pipe cannot seek
back, and opening it again by name gives what is left of it, not its start. So the bytes read
from a pipe are kept, as they arrive, in an unnamed temporary file (in ``$TMPDIR``, deleted
when closed); rewinding reads them back from there, and reading past them reads on from the
pipe. A regular file or a block device is returned as it is opened: nothing is copied.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

__all__ = ["open_dump"]

#: Read-ahead of the buffered reader over a pipe (the parsers read whole blocks anyway).
PIPE_BUFFER = 1 << 20


class _Replay(io.RawIOBase):
    """A non-seekable raw stream made seekable by a spool of everything read from it."""

    def __init__(self, pipe: io.RawIOBase, name: str) -> None:
        import tempfile

        super().__init__()
        self._pipe = pipe
        self._name = name
        self._spool = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self._fd = self._spool.fileno()
        self._pos = 0  # where the next read starts
        self._kept = 0  # bytes read from the pipe so far (all in the spool)

    @property
    def name(self) -> str:
        return self._name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buf).cast("B")
        if not len(view):
            return 0
        if self._pos < self._kept:  # replay the spool
            n = os.preadv(self._fd, [view[:self._kept - self._pos]], self._pos)
        else:
            got = self._pipe.readinto(view)
            n = got or 0
            done = 0
            while done < n:  # keep it before handing it out
                done += os.pwrite(self._fd, view[done:n], self._kept + done)
            self._kept += n
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("a pipe's input seeks from its start only")
        if offset < 0:
            raise ValueError(f"negative seek position {offset}")
        skip = bytearray(1 << 16)
        while self._kept < offset:  # forward past what was read: read (and keep) it
            self._pos = self._kept
            if not self.readinto(memoryview(skip)[:offset - self._kept]):
                break
        self._pos = offset
        return offset

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            try:
                self._pipe.close()
            finally:
                self._spool.close()
        super().close()


def open_dump(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened for reading: as it is when it can seek, else a seekable reader that
    keeps what it reads (module docstring). Raises OSError as open() does."""
    name = os.fspath(path)
    f = open(name, "rb")  # noqa: SIM115 (the caller's to close)
    try:
        if f.seekable():
            return f
    except BaseException:
        f.close()
        raise
    raw = f.detach()
    assert isinstance(raw, io.RawIOBase)
    try:
        replay = _Replay(raw, name)
    except BaseException:
        raw.close()
        raise
    return io.BufferedReader(replay, PIPE_BUFFER)
