"""The build's data partition read back once, in order, for its two readers at the same time.

A gpt build writes its data with ``O_DIRECT`` (``WritablePool(direct=True)``): nothing of it is
left in the page cache, so each later reader would go to the disk. Two need it: the self-check
(``export_thin`` of every thin, which asks for bytes through :meth:`ReadBack.pread`, in
increasing order for volumes without an origin) and the image's sha256 (every byte of the
partition, in order). Here the partition is read once, :data:`WINDOW` bytes at a time
(``O_DIRECT`` where the file system allows, :data:`READERS` requests in flight on threads of
their own, up to :data:`AHEAD` windows ahead of the export), and every window goes to the
hash as the export reaches it. A read behind the
current window (a snapshot's export asking for its origin's blocks again) is a plain ``pread``.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from dmimage.errors import DeviceError

#: Bytes read per request.
WINDOW = 16 << 20
#: Windows read ahead of the one the export is in.
AHEAD = 3
#: Reads in flight at once (a virtual disk reads two requests faster than one).
READERS = 2
#: Buffers in the ring: the window before the current one (may still be hashing), the
#: current one and those read ahead.
RING = AHEAD + 2


class Cancelled(Exception):
    """The read-back stopped because its ``cancel`` event was set."""


class ReadBack:
    """Bytes [start, start+size) of ``path`` as a data device for ``export_thin`` (``size``,
    ``name``, ``pread``), each window also handed to ``feed`` (on a thread of its own, in
    order) as the export reaches it; :meth:`finish` feeds the rest. A view returned by
    :meth:`pread` stays valid until the export is two windows further on. Once ``cancel``
    is set, the next window raises :class:`Cancelled` (the build failed or was interrupted:
    the rest of a large partition is not read and hashed for nothing)."""

    def __init__(self, path: Path, start: int, size: int,
                 feed: Callable[[memoryview], object],
                 cancel: threading.Event | None = None) -> None:
        self.name = str(path)
        self._cancel = cancel
        self.start, self.size = start, size
        self._feed = feed
        self._plain = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._direct: int | None = None
        try:
            try:
                self._direct = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
            except OSError:  # tmpfs and a few others refuse O_DIRECT: read through the cache
                pass
            self._fd = self._direct if self._direct is not None else self._plain
            self._n = -(-size // WINDOW)
            self._bufs = [mmap.mmap(-1, WINDOW) for _ in range(min(RING, self._n))]
            self._views = [memoryview(b) for b in self._bufs]
            self._reader = ThreadPoolExecutor(READERS, thread_name_prefix="read-back")
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="image-sha256")
        except BaseException:  # a half-built reader is never closed by its caller
            for fd in (self._plain, self._direct):
                if fd is not None:
                    os.close(fd)
            raise
        self._reads: dict[int, Future[memoryview]] = {}
        self._hashes: dict[int, Future[object]] = {}
        self._submitted = 0  # windows whose read was submitted
        self._cur = -1  # the window the export is in (fed to the hash)

    def _read_window(self, w: int) -> memoryview:
        """Window ``w`` into its ring buffer, once the hash of its last user is done."""
        slot = w % len(self._bufs)
        before = self._hashes.pop(w - len(self._bufs), None)
        if before is not None:
            before.result()
        n = min(WINDOW, self.size - w * WINDOW)
        view = self._views[slot][:n]
        done = 0
        while done < n:
            off = self.start + w * WINDOW + done
            fd = self._fd
            try:
                got = os.preadv(fd, [view[done:]], off)
            except OSError as exc:
                if fd != self._plain and exc.errno == errno.EINVAL:
                    self._fd = self._plain  # O_DIRECT refused (alignment): the cache
                    continue
                raise DeviceError(f"{self.name}: read at byte {off} failed: "
                                  f"{exc.strerror}") from None
            if got == 0:
                raise DeviceError(f"{self.name}: ends at byte {off}, the data partition "
                                  f"needs {self.start + self.size}")
            done += got
        return view

    def _advance(self, w: int) -> None:
        """Move the export to window ``w``: read ahead, feed every window it passes."""
        while self._cur < w:
            if self._cancel is not None and self._cancel.is_set():
                raise Cancelled(self.name)
            self._cur += 1
            while self._submitted < min(self._n, self._cur + AHEAD + 1):
                s = self._submitted
                self._reads[s] = self._reader.submit(self._read_window, s)
                self._submitted += 1
            view = self._reads.pop(self._cur).result()
            self._hashes[self._cur] = self._hasher.submit(self._feed, view)

    def _window(self, w: int) -> memoryview:
        return self._views[w % len(self._bufs)][: min(WINDOW, self.size - w * WINDOW)]

    def pread(self, n: int, off: int) -> bytes:
        """Up to ``n`` bytes at ``off`` of the partition (fewer at its end): a view of a
        window where the bytes lie at or after the export's window, else a plain read."""
        n = max(0, min(n, self.size - off))
        if n == 0:
            return b""
        w0, w1 = off // WINDOW, (off + n - 1) // WINDOW
        if w0 < self._cur:  # behind the window the export is in
            return os.pread(self._plain, n, self.start + off)
        if w0 == w1:
            self._advance(w0)
            a = off - w0 * WINDOW
            return self._window(w0)[a:a + n]  # type: ignore[return-value]
        parts = []  # across windows: each copied while its buffer is the export's
        for w in range(w0, w1 + 1):
            self._advance(w)
            a = max(off, w * WINDOW) - w * WINDOW
            z = min(off + n, (w + 1) * WINDOW) - w * WINDOW
            parts.append(bytes(self._window(w)[a:z]))
        return b"".join(parts)

    def finish(self) -> None:
        """Feed every window the export did not reach, and wait for the hash."""
        if self._n:
            self._advance(self._n - 1)
        for f in list(self._hashes.values()):
            f.result()
        self._hashes.clear()

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)
        self._hasher.shutdown(wait=True, cancel_futures=True)
        for fd in (self._direct, self._plain):
            if fd is not None:
                os.close(fd)
        for v in self._views:
            v.release()
        for b in self._bufs:
            try:
                b.close()
            except BufferError:  # a view still referenced somewhere: the collector unmaps it
                pass
